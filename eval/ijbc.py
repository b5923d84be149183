"""IJB-B / IJB-C 1:1 verification of a face model (ONNX file or training checkpoint).

    python eval/ijbc.py --model-root model.onnx --image-path /data/IJB_release/IJBC --target IJBC \
        [--batch-size 64] [--result-dir out/] [--mean 127.5 --std 127.5]
    python eval/ijbc.py --checkpoint OUTPUT_DIR --image-path /data/IJB_release/IJBC --target IJBC

--model-root (or --model) is an ONNX file; --checkpoint takes a training run's output folder
(backbone.npz + config.yaml, or -c/--config) and runs the backbone with OneFlow in eval mode and
the training normalisation (--mean/--std and --threads apply to ONNX models only).
Same as `of-face ijbc` (of_face.eval.ijb.main); `python eval/ijbc.py -h` lists every option.

Prints the TAR@FAR table and timings; with --result-dir also writes scores.npy, roc.png, table.md.
"""
import sys

from of_face.eval.ijb import main as ijb_main


def main(argv=None):
    return ijb_main(argv, prog="eval/ijbc.py")


if __name__ == "__main__":
    sys.exit(main())
