"""`of-face <command>`: one entry point for the package's tools.

    of-face train -c CONFIG [-o Section.key=value ...]   single process (scripts/train_ddp.sh for several)
    of-face synth --out DIR                 generate the synthetic identities
    of-face export --checkpoint RUN --out OUT.onnx [-c CONFIG]   backbone -> ONNX, checked vs OneFlow
    of-face embed IMG... (--model X.onnx | --checkpoint RUN) [--landmarks F] [--out emb.npy]
    of-face compare A B (--model | --checkpoint) [--threshold T | --calibrate-bin X.bin]
    of-face verify --bin X.bin (--model X.onnx | --checkpoint RUN)   10-fold .bin accuracy
    of-face ijbc --image-path IJBC/ (--model X.onnx | --checkpoint RUN) [--result-dir D]   IJB-B/C 1:1
    of-face import SRC --model NAME [-o Model.key=value ...] --out backbone.npz
                                            arcface_torch .pth / insightface .onnx -> backbone.npz
    of-face plot RUN                        loss.png, lr.png, verification.png from RUN/metrics.csv
    of-face info RUN                        config highlights, steps done, best accuracy, checkpoints

Every flag means one thing in every command: -c/--config a config file, -o/--override
Section.key=value, --checkpoint a run folder or a checkpoint file, --model an ONNX file, --out an
output path. `of-face <command> -h` describes each command.
"""
import argparse
import os
import sys
from typing import List, Optional

from of_face.errors import ToolError, one_line_errors


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {  # name -> module[:function] (default function: main)
        "train": "of_face.train.main",
        "synth": "of_face.data.synthetic",
        "export": "of_face.export",
        "embed": "of_face.eval.compare:embed_main",
        "compare": "of_face.eval.compare:compare_main",
        "verify": "of_face.eval.compare:verify_main",
        "ijbc": "of_face.eval.ijb",
        "import": "of_face.cli:import_main",
        "plot": "of_face.report:plot_main",
        "info": "of_face.report:info_main",
    }
    if not argv or argv[0] not in commands:
        print(__doc__.strip(), file=sys.stderr)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    module_name, _, func = commands[argv[0]].partition(":")

    def command(args: List[str]) -> int:
        module = __import__(module_name, fromlist=[func or "main"])
        return getattr(module, func or "main")(args)

    from of_face.errors import run_command

    rc = run_command(command, argv[1:])  # any failure: one `error:` line, exit 2 (input) or 1 (runtime)
    if rc:  # commands that return a non-zero status exit with it
        sys.exit(rc)


@one_line_errors
def import_main(argv: List[str]) -> int:
    """`of-face import`: an arcface_torch state dict (.pth, no PyTorch needed) or an insightface ONNX
    (IResNet / MobileFaceNet) -> a normal backbone.npz, plus a config.yaml with its Model section
    next to it (when none is there) so `--checkpoint` commands need no -c."""
    ap = argparse.ArgumentParser(prog="of-face import", description=import_main.__doc__)
    ap.add_argument("src", help="backbone .pth/.pt (state dict) or .onnx")
    ap.add_argument("--model", required=True, help="of_face Model.name (iresnet50, mbf, vit_t, ...)")
    ap.add_argument("-o", "--override", action="append", default=[], help="Section.key=value (e.g. Model.width=32)")
    ap.add_argument("--out", required=True, help="output backbone.npz (or a folder to write backbone.npz into)")
    args = ap.parse_args(argv)
    from of_face.config import load_config, save_config
    from of_face.io import check_output
    from of_face.models import build_backbone
    from of_face.models.interop import import_state
    from of_face.models.weights import BACKBONE_FILE, write_backbone
    from of_face.run.names import CONFIG_FILE

    out = os.path.join(args.out, BACKBONE_FILE) if os.path.isdir(args.out) else args.out
    check_output(out, "--out", "backbone.npz")
    if not os.path.isfile(args.src):
        raise ToolError(f"{args.src}: {'is a folder' if os.path.isdir(args.src) else 'not found'}; expected an "
                        "arcface_torch .pth state dict or an insightface .onnx file")
    # a refused config value or weights file (ConfigError, WeightsFileError: ValueErrors) is one line
    cfg = load_config(None, [f"Model.name={args.model}", *args.override])
    state = import_state(args.src, build_backbone(cfg.Model))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_backbone(state, out)
    config = os.path.join(os.path.dirname(os.path.abspath(out)), CONFIG_FILE)
    note = ""
    if not os.path.exists(config):
        save_config(cfg, config)
        note = f" and {config}"
    print(f"{args.src} -> {out}{note} ({len(state)} tensors, Model.name={cfg.Model.name})")
    return 0


if __name__ == "__main__":
    main()
