"""10-fold verification accuracy of an ONNX face model on insightface .bin pair files.

    python eval/verification.py --model model.onnx --bin lfw.bin [--bin cfp_fp.bin] [--mean 127.5 --std 127.5]
"""
import argparse
import sys
from pathlib import Path

from of_face.eval.onnx_embedder import OnnxEmbedder
from of_face.eval.verification import verify_bin


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="ONNX model file")
    ap.add_argument("--bin", action="append", required=True, help="a .bin file (repeatable)")
    # insightface's default normalisation; the shared MobileFaceNet wants --std 128.
    ap.add_argument("--mean", type=float, default=127.5)
    ap.add_argument("--std", type=float, default=127.5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    args = ap.parse_args(argv)

    embed = OnnxEmbedder(args.model, mean=args.mean, std=args.std, threads=args.threads)
    for path in args.bin:
        r = verify_bin(path, embed, batch_size=args.batch_size)
        # XNorm as insightface logs it: mean norm of single (not flip-summed) embeddings.
        print(f"{Path(path).stem}: {r['accuracy']:.4f} ± {r['std']:.4f}, XNorm {r['xnorm_single']:.2f}, "
              f"VAL@FAR=1e-3 {r['val']:.4f} ± {r['val_std']:.4f} (FAR {r['far']:.4f}), {r['pairs']} pairs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
