"""IJB-B / IJB-C 1:1 verification of an ONNX face model.

    python eval/ijbc.py --model-root model.onnx --image-path /data/IJB_release/IJBC --target IJBC \
        [--batch-size 64] [--result-dir out/] [--mean 127.5 --std 127.5]

Prints the TAR@FAR table and timings; with --result-dir also writes scores.npy, roc.png, table.md.
"""
import argparse
import sys

from of_face.eval.ijb import evaluate_ijb, format_table
from of_face.eval.onnx_embedder import OnnxEmbedder


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-root", required=True, help="ONNX model file")
    ap.add_argument("--image-path", required=True, help="folder holding meta/ and loose_crop/")
    ap.add_argument("--target", default="IJBC", choices=["IJBC", "IJBB"])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--result-dir", default=None, help="write scores.npy, roc.png, table.md here")
    # insightface's default normalisation; the shared MobileFaceNet wants --std 128.
    ap.add_argument("--mean", type=float, default=127.5)
    ap.add_argument("--std", type=float, default=127.5)
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    ap.add_argument("--workers", type=int, default=None, help="image decode/align threads")
    ap.add_argument("--no-norm-score", action="store_true", help="L2-normalise each image feature (N0)")
    ap.add_argument("--no-detector-score", action="store_true", help="ignore faceness scores (D0)")
    ap.add_argument("--no-flip", action="store_true", help="no flipped-image feature (F0)")
    args = ap.parse_args(argv)

    embed = OnnxEmbedder(args.model_root, mean=args.mean, std=args.std, threads=args.threads)
    result = evaluate_ijb(args.image_path, embed, target=args.target, batch_size=args.batch_size,
                          use_norm_score=not args.no_norm_score,
                          use_detector_score=not args.no_detector_score,
                          use_flip_test=not args.no_flip, workers=args.workers,
                          result_dir=args.result_dir)
    print(format_table(result))
    t = result["timing"]
    print(f"images {t['images']}: preprocessing {t['preprocess_s']:.1f} s (thread time, "
          f"{t['preprocess_wait_s']:.1f} s not overlapped), inference {t['inference_s']:.1f} s, "
          f"scoring {t['scoring_s']:.2f} s ({t['pairs_per_s']:,.0f} pairs/s)")
    if args.result_dir:
        print(f"wrote scores.npy, roc.png, table.md to {args.result_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
