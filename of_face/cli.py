"""`of-face <command>`: one entry point for the package's tools.

    of-face train -c CONFIG [-o k=v ...]   single process (use scripts/train_ddp.sh for several)
    of-face synth --out DIR                 generate the synthetic identities
    of-face export -c RUN -o OUT.onnx       backbone -> ONNX (dynamic batch), checked vs OneFlow
    of-face embed IMG... (--model X.onnx | --checkpoint RUN) [--landmarks F] [--out emb.npy]
    of-face compare A B (--model | --checkpoint) [--threshold T | --calibrate-bin X.bin]
    of-face verify --bin X.bin (--model X.onnx | --checkpoint RUN)   10-fold .bin accuracy
    of-face plot RUN                        loss.png, lr.png, verification.png from RUN/metrics.csv
    of-face info RUN                        config highlights, steps done, best accuracy, checkpoints

`of-face <command> -h` describes each command.
"""
import sys


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {  # name -> module[:function] (default function: main)
        "train": "of_face.train.main",
        "synth": "of_face.data.synthetic",
        "export": "of_face.export",
        "embed": "of_face.eval.compare:embed_main",
        "compare": "of_face.eval.compare:compare_main",
        "verify": "of_face.eval.compare:verify_main",
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
