"""`python -m of_face.train.main -c CONFIG [-o Section.key=value ...]` (run under the launcher)."""
import argparse
import gc
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
    from of_face.run.lock import die_with_parent
    from of_face.train.errors import guard_rank

    guard_rank()  # under of_face.train.launch: die with the launcher
    if "LOCAL_RANK" in os.environ:  # under oneflow.distributed.launch too (not a nohup'ed single
        die_with_parent()  # process, whose parent is a shell that may go away)
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.override)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    from of_face.train.trainer import run  # imports OneFlow: only after the config is valid

    run(cfg)
    # Collect reference cycles that still hold OneFlow tensors or graphs now, while OneFlow runs:
    # left to the collector at interpreter exit they may be freed after OneFlow's shutdown, and
    # the process then never exits (measured: a resumed 2-rank graph run hung after "done", and
    # whether it did depended on when the collector last happened to run).
    gc.collect()


if __name__ == "__main__":
    main()
