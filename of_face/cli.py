"""`of-face <command>`: one entry point for the package's tools.

    of-face train -c CONFIG [-o Section.key=value ...]   single process (scripts/train_ddp.sh for several)
    of-face synth --out DIR                 generate the synthetic identities
    of-face export --checkpoint RUN --out OUT.onnx [-c CONFIG]   backbone -> ONNX, checked vs OneFlow
    of-face embed IMG... (--model X.onnx | --checkpoint RUN) [--landmarks F] [--out emb.npy]
    of-face compare A B (--model | --checkpoint) [--threshold T | --calibrate-bin X.bin]
    of-face verify --bin X.bin (--model X.onnx | --checkpoint RUN)   10-fold .bin accuracy
    of-face ijbc --image-path IJBC/ (--model X.onnx | --checkpoint RUN) [--result-dir D]   IJB-B/C 1:1
    of-face plot RUN                        loss.png, lr.png, verification.png from RUN/metrics.csv
    of-face info RUN                        config highlights, steps done, best accuracy, checkpoints

Every flag means one thing in every command: -c/--config a config file, -o/--override
Section.key=value, --checkpoint a run folder or a checkpoint file, --model an ONNX file, --out an
output path. `of-face <command> -h` describes each command.
"""
import sys
from typing import List, Optional


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
        "plot": "of_face.report:plot_main",
        "info": "of_face.report:info_main",
    }
    if not argv or argv[0] not in commands:
        print(__doc__.strip(), file=sys.stderr)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    module_name, _, func = commands[argv[0]].partition(":")
    module = __import__(module_name, fromlist=[func or "main"])
    rc = getattr(module, func or "main")(argv[1:])
    if rc:  # commands that return a non-zero status exit with it
        sys.exit(rc)


if __name__ == "__main__":
    main()
