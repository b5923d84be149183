"""10-fold verification accuracy of a face model on insightface .bin pair files.

    python eval/verification.py --model model.onnx --bin lfw.bin [--bin cfp_fp.bin] [--mean 127.5 --std 127.5]
    python eval/verification.py --checkpoint OUTPUT_DIR --bin lfw.bin

--model: an ONNX file, pixels normalised as (x - mean) / std (the shared MobileFaceNet wants --std 128).
--checkpoint: a training run's output folder (backbone.npz + config.yaml, or --config) run with
OneFlow in eval mode and the training normalisation; --mean/--std do not apply.
Same as `of-face verify`.
"""
import sys

from of_face.eval.compare import verify_main


def main(argv=None):
    return verify_main(argv, prog="eval/verification.py")


if __name__ == "__main__":
    sys.exit(main())
