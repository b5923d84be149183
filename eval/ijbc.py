"""IJB-B / IJB-C 1:1 verification of a face model (ONNX file or training checkpoint).

    python eval/ijbc.py --model-root model.onnx --image-path /data/IJB_release/IJBC --target IJBC \
        [--batch-size 64] [--result-dir out/] [--mean 127.5 --std 127.5]
    python eval/ijbc.py --checkpoint OUTPUT_DIR --image-path /data/IJB_release/IJBC --target IJBC

--checkpoint takes a training run's output folder (backbone.npz + config.yaml, or --config) and
runs the backbone with OneFlow in eval mode and the training normalisation (--mean/--std and
--threads apply to ONNX models only).

Prints the TAR@FAR table and timings; with --result-dir also writes scores.npy, roc.png, table.md.
"""
import argparse
import sys

from of_face.eval.ijb import evaluate_ijb, format_table


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = ap.add_mutually_exclusive_group(required=True)
    model.add_argument("--model-root", help="ONNX model file")
    model.add_argument("--checkpoint", help="training run folder (backbone.npz + config.yaml) or a backbone.npz")
    ap.add_argument("--config", default=None, help="with --checkpoint: config.yaml if not next to it")
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

    if args.checkpoint:
        from of_face.eval.checkpoint_embedder import CheckpointEmbedder

        embed = CheckpointEmbedder(args.checkpoint, config=args.config)
    else:
        from of_face.eval.onnx_embedder import OnnxEmbedder

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
