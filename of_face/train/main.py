"""`python -m of_face.train.main -c CONFIG [-o Section.key=value ...]` (run under the launcher)."""
import argparse
import os
import sys

from of_face.config import ConfigError, load_config


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a face-recognition model with of_face")
    p.add_argument("-c", "--config", default="configs/default.yaml", help="YAML config file")
    p.add_argument("-o", "--override", action="append", default=[], metavar="Section.key=value",
                   help="override one config value (repeatable); values are YAML scalars or lists")
    return p.parse_args(argv)


def main(argv=None):
    from of_face.run_folder import die_with_parent

    if "LOCAL_RANK" in os.environ:  # started by a launcher: a rank never outlives it (not a nohup'ed
        die_with_parent()  # single process, whose parent is a shell that may go away)
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.override)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    from of_face.train.trainer import run  # imports OneFlow: only after the config is valid

    run(cfg)


if __name__ == "__main__":
    main()
