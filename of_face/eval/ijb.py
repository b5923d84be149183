"""IJB-B / IJB-C 1:1 template verification (insightface `onnx_ijbc.py` protocol).

Layout under `image_path`: meta/<p>_face_tid_mid.txt, meta/<p>_template_pair_label.txt,
meta/<p>_name_5pts_score.txt and loose_crop/, with <p> = ijbc or ijbb.
Pipeline: 5-point alignment -> (image + flip) embedding -> optional per-image L2 normalisation
and faceness weighting -> template = sum over media of the mean over that media's images ->
L2 normalise -> cosine per pair -> ROC -> TAR at FAR 1e-6 .. 1e-1.
"""
import argparse
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from sklearn.metrics import auc, roc_curve

from of_face.eval.align import align_face
from of_face.eval.embedders import add_model_args, embedder_from_args, one_line_errors
from of_face.io import atomic_write, check_output
from of_face.scoring import flip_embed, interp_step

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def _rows(path, n_fields):
    """Whitespace-separated rows of a meta file, each checked to have n_fields fields."""
    rows = [ln.split() for ln in Path(path).read_text().splitlines() if ln.strip()]
    bad = next((i for i, r in enumerate(rows) if len(r) != n_fields), None)
    if bad is not None:
        raise ValueError(f"{path}: line {bad + 1} has {len(rows[bad])} fields, expected {n_fields}")
    return rows


def read_layout(image_path, target="IJBC"):
    """Parse the meta files; returns a dict of numpy arrays (one row per image / per pair)."""
    root = Path(image_path)
    if target.upper() not in ("IJBC", "IJBB"):
        raise ValueError(f"target must be IJBC or IJBB, got {target!r}")
    meta, prefix = root / "meta", target.lower()
    needed = [meta / f"{prefix}_{name}.txt" for name in ("face_tid_mid", "name_5pts_score", "template_pair_label")]
    missing = [str(p.relative_to(root)) for p in needed + [root / "loose_crop"] if not p.exists()]
    if missing:  # all at once: a partly copied layout is fixed in one go
        raise FileNotFoundError(f"{root}: missing {', '.join(missing)} (an {target.upper()} layout: meta/ with "
                                f"{prefix}_face_tid_mid.txt, {prefix}_name_5pts_score.txt, "
                                f"{prefix}_template_pair_label.txt, and loose_crop/)")
    tid_mid = _rows(meta / f"{prefix}_face_tid_mid.txt", 3)
    lmk = _rows(meta / f"{prefix}_name_5pts_score.txt", 12)
    # IJB-C lists 15.7 M pairs: one split of the whole text is much faster than np.loadtxt.
    pairs = np.array((meta / f"{prefix}_template_pair_label.txt").read_text().split(), dtype=np.int64)
    if pairs.size % 3:
        raise ValueError(f"{meta}/{prefix}_template_pair_label.txt: expected 3 fields per line")
    pairs = pairs.reshape(-1, 3)
    names = [row[0] for row in lmk]
    # The protocol joins these two files by line number; a silent misalignment would corrupt
    # every template, so insist on identical image order.
    if [row[0] for row in tid_mid] != names:
        raise ValueError(f"{meta}: {prefix}_face_tid_mid.txt and {prefix}_name_5pts_score.txt list different images")
    if not names:
        raise ValueError(f"{meta}: no images listed")
    return {
        "images": [str(root / "loose_crop" / n) for n in names],
        "landmarks": np.array([row[1:11] for row in lmk], dtype=np.float64).reshape(-1, 5, 2),
        "faceness": np.array([row[11] for row in lmk], dtype=np.float64),
        "templates": np.array([row[1] for row in tid_mid], dtype=np.int64),
        "medias": np.array([row[2] for row in tid_mid], dtype=np.int64),
        "pairs": pairs[:, :2],
        "labels": pairs[:, 2],
    }


def load_aligned(path, landmarks5):
    """Decode one image as RGB and warp it onto the 112x112 ArcFace template (timed). Decoded by
    OpenCV, as insightface's onnx_ijbc.py does (cv2.imread, BGR -> RGB)."""
    import cv2

    start = time.perf_counter()
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        what = "file not found" if not os.path.isfile(path) else "could not be decoded as an image"
        raise ValueError(f"{path}: {what}")
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    return align_face(rgb, landmarks5), time.perf_counter() - start


def embed_images(paths, landmarks, embed_fn, batch_size=64, use_flip_test=True, workers=None):
    """Features [N, d] (image + flip when use_flip_test) and a timing dict.

    Images are decoded and aligned by a thread pool (PIL and numpy release the GIL) one batch
    ahead of the model, so memory stays bounded by a few batches even for the full IJB-C.
    """
    workers = workers or min(8, os.cpu_count() or 1)
    starts = list(range(0, len(paths), batch_size))
    feats, prep_cpu, wait, infer = [], 0.0, 0.0, 0.0
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        def submit(s):
            end = min(s + batch_size, len(paths))
            return [pool.submit(load_aligned, paths[i], landmarks[i]) for i in range(s, end)]

        queue = deque(submit(s) for s in starts[:2])
        for k in range(len(starts)):
            t = time.perf_counter()
            done = [f.result() for f in queue.popleft()]
            wait += time.perf_counter() - t
            if k + 2 < len(starts):
                queue.append(submit(starts[k + 2]))
            batch = np.stack([img for img, _ in done])
            prep_cpu += sum(dt for _, dt in done)
            t = time.perf_counter()
            if use_flip_test:
                f = flip_embed(embed_fn, batch, batch_size=len(batch), dedupe=False, dtype=np.float64)
            else:
                f = np.asarray(embed_fn(batch), dtype=np.float64)
            infer += time.perf_counter() - t
            feats.append(f)
    timing = {"preprocess_s": prep_cpu, "preprocess_wait_s": wait, "inference_s": infer,
              "embed_wall_s": time.perf_counter() - t0, "images": len(paths)}
    return np.concatenate(feats), timing


def template_features(img_feats, templates, medias):
    """Sum over media of the mean image feature per media, L2-normalised: ([T, d], template ids)."""
    # Media ids are only grouped inside a template, so key the media by (template, media).
    # Sorting once and summing contiguous runs (reduceat) is far faster than np.add.at.
    order = np.lexsort((medias, templates))
    t_sorted, m_sorted = templates[order], medias[order]
    m_starts = np.flatnonzero(np.r_[True, (t_sorted[1:] != t_sorted[:-1]) | (m_sorted[1:] != m_sorted[:-1])])
    counts = np.diff(np.r_[m_starts, len(order)])
    media_mean = np.add.reduceat(img_feats[order], m_starts, axis=0) / counts[:, None]
    media_template = t_sorted[m_starts]  # sorted, so each template's media are contiguous
    t_starts = np.flatnonzero(np.r_[True, media_template[1:] != media_template[:-1]])
    feats = np.add.reduceat(media_mean, t_starts, axis=0)
    feats /= np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    return feats, media_template[t_starts]


def pair_scores(feats, template_ids, pairs, chunk=100_000):
    """Cosine score of every (template1, template2) pair, in chunks to bound memory."""
    pos = np.searchsorted(template_ids, pairs)  # template_ids is sorted (np.unique)
    pos = np.minimum(pos, len(template_ids) - 1)
    missing = template_ids[pos] != pairs
    if missing.any():
        raise ValueError(f"pair list uses templates without images, e.g. {pairs[missing][:5].tolist()}")
    scores = np.empty(len(pairs))
    for s in range(0, len(pairs), chunk):
        a, b = pos[s:s + chunk, 0], pos[s:s + chunk, 1]
        scores[s:s + chunk] = np.einsum("ij,ij->i", feats[a], feats[b])
    return scores


def tar_at_far(labels, scores, fars=FARS):
    """TAR at each FAR: `nearest` = insightface rule, `interp` = linear on the ROC curve."""
    fpr, tpr, _ = roc_curve(labels, scores)
    nearest, interp = [], []
    for far in fars:
        gap = np.abs(fpr - far)
        # Upstream flips the curve and takes the first minimum: among equally near ROC points
        # it picks the last one (highest TPR); we reproduce that tie-break.
        nearest.append(float(tpr[np.flatnonzero(gap == gap.min())[-1]]))
        interp.append(interp_step(fpr, tpr, far))
    return {"fars": list(fars), "tar": nearest, "tar_interp": interp,
            "auc": float(auc(fpr, tpr)), "fpr": fpr, "tpr": tpr}


def evaluate_ijb(image_path, embed_fn, target="IJBC", batch_size=64, use_norm_score=True,
                 use_detector_score=True, use_flip_test=True, workers=None, result_dir=None):
    """Full 1:1 evaluation; embed_fn: uint8 RGB [n, 112, 112, 3] -> [n, d] (ONNX or checkpoint).

    Switches as in the standard protocol: use_norm_score keeps each image's feature norm as a
    quality weight (False: L2-normalise per image), use_detector_score weights by faceness,
    use_flip_test adds the flipped image's feature.
    """
    layout = read_layout(image_path, target)
    feats, timing = embed_images(layout["images"], layout["landmarks"], embed_fn, batch_size,
                                 use_flip_test, workers)
    if not use_norm_score:
        feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    if use_detector_score:
        feats = feats * layout["faceness"][:, None]
    t = time.perf_counter()
    tfeats, tids = template_features(feats, layout["templates"], layout["medias"])
    scores = pair_scores(tfeats, tids, layout["pairs"])
    result = tar_at_far(layout["labels"], scores)
    timing["scoring_s"] = time.perf_counter() - t
    timing["pairs_per_s"] = len(scores) / max(timing["scoring_s"], 1e-9)
    result.update(scores=scores, labels=layout["labels"], timing=timing, target=target.upper(),
                  pairs=len(scores), templates=len(tids))
    if result_dir:
        save_results(result, result_dir)
    return result


def format_table(result):
    head = "| TAR (%) @ FAR | " + " | ".join(f"{f:.0e}" for f in result["fars"]) + " |"
    rows = [head, "|" + "---|" * (len(result["fars"]) + 1)]
    for label, key in (("nearest", "tar"), ("interpolated", "tar_interp")):
        rows.append(f"| {result['target']} {label} | " + " | ".join(f"{100 * v:.2f}" for v in result[key]) + " |")
    rows.append(f"AUC {result['auc']:.5f}, {result['pairs']} pairs, {result['templates']} templates")
    return "\n".join(rows)


def save_results(result, result_dir):
    """scores.npy, roc.png and table.md under result_dir."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or GUI state
    from matplotlib.ticker import FuncFormatter, NullFormatter

    out = Path(result_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "scores.npy") as f:
        np.save(f, result["scores"])
    with atomic_write(out / "table.md") as f:
        f.write((format_table(result) + "\n").encode())
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    ax.plot(np.maximum(result["fpr"], 1e-7), result["tpr"], lw=1.5,
            label=f"{result['target']} (AUC {100 * result['auc']:.2f}%)")
    ax.set(xscale="log", xlim=(1e-6, 1), ylim=(0.3, 1.0), xlabel="False Positive Rate",
           ylabel="True Positive Rate", title=f"ROC on {result['target']}")
    # Plain "1e-04" tick labels: the default log labels go through mathtext, slow and noisy.
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0e}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="both", linestyle=":", linewidth=0.5)
    ax.legend(loc="lower right")
    with atomic_write(out / "roc.png") as f:
        fig.savefig(f, format="png", dpi=120)


MAIN_DOC = """IJB-B / IJB-C 1:1 verification of a face model (ONNX file or training checkpoint).

    of-face ijbc --model model.onnx --image-path /data/IJB_release/IJBC --target IJBC \\
        [--batch-size 64] [--result-dir out/] [--mean 127.5 --std 127.5]
    of-face ijbc --checkpoint OUTPUT_DIR --image-path /data/IJB_release/IJBC --target IJBC

--model (alias --model-root, insightface's name) is an ONNX file, pixels normalised as
(x - mean) / std (default 127.5 / 127.5, raw pixels for an of_face export with baked
normalisation; the shared MobileFaceNet wants --std 128). --checkpoint takes a training run's
output folder (backbone.npz + config.yaml, or -c/--config) and runs the backbone with OneFlow in
eval mode and the training normalisation (--mean/--std and --threads apply to ONNX models only).

Prints the TAR@FAR table and timings; with --result-dir also writes scores.npy, roc.png, table.md.
"""


@one_line_errors
def main(argv=None, prog: str = "of-face ijbc") -> int:
    """`of-face ijbc` / eval/ijbc.py: the TAR@FAR table (and files with --result-dir) of one model."""
    ap = argparse.ArgumentParser(prog=prog, description=MAIN_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--image-path", required=True, help="folder holding meta/ and loose_crop/")
    ap.add_argument("--target", default="IJBC", choices=["IJBC", "IJBB"])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--result-dir", "--out", dest="result_dir", default=None,
                    help="write scores.npy, roc.png, table.md to this folder")
    ap.add_argument("--workers", type=int, default=None, help="image decode/align threads")
    ap.add_argument("--no-norm-score", action="store_true", help="L2-normalise each image feature (N0)")
    ap.add_argument("--no-detector-score", action="store_true", help="ignore faceness scores (D0)")
    ap.add_argument("--no-flip", action="store_true", help="no flipped-image feature (F0)")
    args = ap.parse_args(argv)
    if args.result_dir:  # an unwritable result folder is found now, not after embedding every image
        check_output(os.path.join(args.result_dir, "scores.npy"), "--result-dir", "results")
    result = evaluate_ijb(args.image_path, embedder_from_args(args), target=args.target, batch_size=args.batch_size,
                          use_norm_score=not args.no_norm_score, use_detector_score=not args.no_detector_score,
                          use_flip_test=not args.no_flip, workers=args.workers, result_dir=args.result_dir)
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
