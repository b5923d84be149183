"""P5: IJB-C 1:1 evaluation wall time on ijbc_mini with the shared ONNX model.

    PY=$(bash scripts/setup.sh)
    $PY bench/ijbc_eval.py [--repeat 3] [--image-path ../shared/data/ijbc_mini]
        [--model ../shared/models/mobilefacenet_192d.onnx] [--scoring-pairs 1000000]

Runs `of_face.eval.ijb.evaluate_ijb` (5-point alignment, flip test, norm and faceness weighting,
template pooling, cosine scores, ROC) with the MobileFaceNet at mean 127.5 / std 128, `repeat`
times, and prints for each run: total wall time, preprocessing (decode + align; summed thread
time, and the part the model waited for), inference (onnxruntime, image + flip), scoring
(template pooling + pair cosines + ROC) and the scoring's pairs/s. In evaluate_ijb decoding runs
in threads alongside the model, so on few cores the two compete; the phases are then also timed
one after the other (decode + align serially and in the thread pool, inference on the aligned
stack, scoring), which splits the time cleanly. ijbc_mini has only 6,160
pairs, so the scoring step is also timed alone on `--scoring-pairs` random pairs over 23,124
random 192-d templates (IJB-C's template count) to give a throughput that predicts the 15.7 M
pairs of the full IJB-C. Results go to docs/BENCHMARKS.md ("P5: IJB evaluation").
"""
import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np

from of_face.eval.ijb import format_table, pair_scores, evaluate_ijb
from of_face.eval.onnx_embedder import OnnxEmbedder

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except Exception:
        return platform.processor() or "unknown"


def scoring_throughput(n_pairs, n_templates=23124, dim=192, seed=0):
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((n_templates, dim))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    tids = np.arange(n_templates, dtype=np.int64) * 3 + 1  # sorted, not contiguous ids
    pairs = tids[rng.integers(0, n_templates, size=(n_pairs, 2))]
    t = time.perf_counter()
    pair_scores(feats, tids, pairs)
    seconds = time.perf_counter() - t
    return seconds, n_pairs / seconds


def separate_phases(image_path, embed, batch_size=64, workers=None):
    """The three phases one after the other (no overlap, so no competition for the cores)."""
    from concurrent.futures import ThreadPoolExecutor

    from of_face.eval.ijb import load_aligned, read_layout, tar_at_far, template_features

    layout = read_layout(image_path, "IJBC")
    paths, lmk = layout["images"], layout["landmarks"]
    t = time.perf_counter()
    serial = [load_aligned(p, marks)[0] for p, marks in zip(paths, lmk)]
    serial_s = time.perf_counter() - t
    t = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        faces = np.stack([f for f, _ in pool.map(lambda a: load_aligned(*a), zip(paths, lmk))])
    pooled_s = time.perf_counter() - t
    assert np.array_equal(faces, np.stack(serial))
    t = time.perf_counter()
    feats = []
    for s in range(0, len(faces), batch_size):
        b = faces[s:s + batch_size]
        flipped = np.ascontiguousarray(b[:, :, ::-1])
        feats.append(np.asarray(embed(b), np.float64) + np.asarray(embed(flipped), np.float64))
    feats = np.concatenate(feats)
    infer_s = time.perf_counter() - t
    t = time.perf_counter()
    feats = feats * layout["faceness"][:, None]
    tfeats, tids = template_features(feats, layout["templates"], layout["medias"])
    scores = pair_scores(tfeats, tids, layout["pairs"])
    tar_at_far(layout["labels"], scores)
    score_s = time.perf_counter() - t
    return {"preprocess_serial_s": serial_s, "preprocess_threads_s": pooled_s, "inference_s": infer_s,
            "scoring_s": score_s, "pairs_per_s": len(scores) / score_s, "images": len(paths),
            "ms_per_forward": 1e3 * infer_s / (2 * len(paths))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-path", default=str(SHARED / "data" / "ijbc_mini"))
    ap.add_argument("--model", default=str(SHARED / "models" / "mobilefacenet_192d.onnx"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None, help="decode/align threads (default: min(8, cores))")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")
    ap.add_argument("--scoring-pairs", type=int, default=1_000_000)
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)

    print(f"machine: {os.cpu_count()} cores, {cpu_model()}; load average before: "
          f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    embed = OnnxEmbedder(args.model, mean=127.5, std=128.0, threads=args.threads)
    embed(np.zeros((2, 112, 112, 3), np.uint8))  # session warm-up (allocations), not timed
    runs = []
    for k in range(args.repeat):
        t = time.perf_counter()
        r = evaluate_ijb(args.image_path, embed, target="IJBC", batch_size=args.batch_size, workers=args.workers)
        wall = time.perf_counter() - t
        tm = dict(r["timing"], total_wall_s=wall)
        runs.append(tm)
        if k == 0:
            print(format_table(r))
        print(f"run {k + 1}: total {wall:.2f} s | preprocessing {tm['preprocess_s']:.2f} s thread time "
              f"({tm['preprocess_wait_s']:.2f} s waited for) | inference {tm['inference_s']:.2f} s "
              f"({tm['images']} images + flips) | scoring {tm['scoring_s'] * 1e3:.1f} ms "
              f"({r['pairs']} pairs, {tm['pairs_per_s']:,.0f} pairs/s)")
    med = {key: float(np.median([r[key] for r in runs])) for key in runs[0]}
    print(f"median of {len(runs)}: total {med['total_wall_s']:.2f} s, preprocessing {med['preprocess_s']:.2f} s "
          f"(waited {med['preprocess_wait_s']:.2f} s), inference {med['inference_s']:.2f} s, "
          f"scoring {med['scoring_s'] * 1e3:.1f} ms ({med['pairs_per_s']:,.0f} pairs/s)")
    result = {"runs": runs, "median": med}
    phases = [separate_phases(args.image_path, embed, args.batch_size, args.workers) for _ in range(args.repeat)]
    ph = {key: float(np.median([p[key] for p in phases])) for key in phases[0]}
    print(f"phases alone (median of {len(phases)}): preprocessing {ph['preprocess_serial_s']:.2f} s in one thread, "
          f"{ph['preprocess_threads_s']:.2f} s in the thread pool | inference {ph['inference_s']:.2f} s "
          f"({ph['ms_per_forward']:.1f} ms per forward, batch {args.batch_size}) | scoring "
          f"{ph['scoring_s'] * 1e3:.1f} ms ({ph['pairs_per_s']:,.0f} pairs/s)")
    result["phases_alone"] = ph
    if args.scoring_pairs:
        seconds, rate = scoring_throughput(args.scoring_pairs)
        print(f"pair scoring alone: {args.scoring_pairs:,} pairs over 23,124 templates x 192-d in "
              f"{seconds:.2f} s = {rate:,.0f} pairs/s")
        result["scoring_only"] = {"pairs": args.scoring_pairs, "seconds": seconds, "pairs_per_s": rate}
    print(f"load average after: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
