"""1:1 verification on insightface .bin pair files (LFW, CFP-FP, AgeDB-30, ... format).

Protocol as insightface `eval/verification.py` (and arcface_torch's CallBackVerification):
embedding of image + embedding of its horizontal flip, summed, L2-normalised; squared L2
distance; thresholds 0, 0.01, ..., 3.99; unshuffled K-fold, best threshold on the train folds,
accuracy on the test fold. VAL@FAR=1e-3 uses thresholds in steps of 0.001.
"""
import hashlib
import io
import pickle
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.model_selection import KFold


def _decode(entry):
    """JPEG/PNG bytes (bytes, bytearray, py2 str or numpy uint8 array) -> RGB uint8 array."""
    if isinstance(entry, np.ndarray):
        raw = entry.tobytes()  # e.g. arcface_paddle files store uint8 arrays of shape (n, 1)
    elif isinstance(entry, str):
        raw = entry.encode("latin1")  # a py2 str unpickled as text
    else:
        raw = bytes(entry)
    with Image.open(io.BytesIO(raw)) as img:
        return np.asarray(img.convert("RGB"))


def read_bin_entries(path):
    """The raw pickle of a verification .bin: (encoded images, issame bool [P]), count-checked."""
    with open(path, "rb") as f:
        try:
            bins, issame = pickle.load(f)
        except UnicodeDecodeError:
            # Written by Python 2: its `str` image bytes only load as bytes.
            f.seek(0)
            bins, issame = pickle.load(f, encoding="bytes")
    issame = np.asarray(issame, dtype=np.bool_).reshape(-1)
    if len(bins) % 2 or len(bins) != 2 * len(issame):
        raise ValueError(
            f"{path}: {len(bins)} images for {len(issame)} pairs (need an even count = 2 x pairs)"
        )
    return bins, issame


def load_bin(path, image_size=(112, 112)):
    """Read a verification .bin: returns (images uint8 [2P, H, W, 3] RGB, issame bool [P])."""
    path = Path(path)
    bins, issame = read_bin_entries(path)
    images = np.empty((len(bins), image_size[0], image_size[1], 3), dtype=np.uint8)
    decoded = {}  # repeated images are often one shared object in the pickle: decode once
    for i, entry in enumerate(bins):
        key = id(entry)
        if key not in decoded:
            try:
                decoded[key] = _decode(entry)
            except Exception as exc:
                raise ValueError(f"{path}: image {i} does not decode ({exc})") from exc
        img = decoded[key]
        if img.shape[:2] != tuple(image_size):
            raise ValueError(f"{path}: image {i} is {img.shape[1]}x{img.shape[0]}, expected "
                             f"{image_size[1]}x{image_size[0]}")
        images[i] = img
    return images, issame


def _count_below(sorted_values, thresholds):
    """How many values are strictly below each threshold (insightface predicts same if dist < t)."""
    return np.searchsorted(sorted_values, thresholds, side="left")


def _rates(dist, issame, thresholds):
    """(true accepts, false accepts, n_same, n_diff) for every threshold, vectorised."""
    same = np.sort(dist[issame])
    diff = np.sort(dist[~issame])
    return _count_below(same, thresholds), _count_below(diff, thresholds), len(same), len(diff)


def interp_step(x, y, x0):
    """y at x0 on a piecewise-linear curve through (x, y) where x is non-decreasing with repeats.

    scipy's interp1d refuses repeated x (insightface#2152). A repeated x is a vertical segment of
    the curve, so we pass from its last point to the first point of the next x value: inside a
    run of equal x we take the last y, between two runs we interpolate linearly.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    j = int(np.searchsorted(x, x0, side="right")) - 1  # last index with x <= x0
    if j < 0:
        return float(y[0])
    if x[j] == x0 or j == len(x) - 1:
        return float(y[j])
    frac = (x0 - x[j]) / (x[j + 1] - x[j])
    return float(y[j] + frac * (y[j + 1] - y[j]))


def evaluate(embeddings, issame, nfolds=10, far_target=1e-3):
    """10-fold verification metrics; embeddings [2P, d] (image+flip already summed), issame [P]."""
    emb = np.asarray(embeddings, dtype=np.float64)
    issame = np.asarray(issame, dtype=np.bool_).reshape(-1)
    if emb.ndim != 2 or len(emb) != 2 * len(issame):
        raise ValueError(f"need [2P, d] embeddings for P={len(issame)} pairs, got {emb.shape}")
    norms = np.linalg.norm(emb, axis=1)
    unit = emb / np.maximum(norms, 1e-12)[:, None]
    dist = np.sum((unit[0::2] - unit[1::2]) ** 2, axis=1)

    acc_thresholds = np.arange(0, 4, 0.01)
    val_thresholds = np.arange(0, 4, 0.001)
    accuracy, best, val, far = [], [], [], []
    # KFold with one split is invalid in sklearn; insightface then trains and tests on everything.
    folds = (KFold(n_splits=nfolds, shuffle=False).split(dist) if nfolds > 1
             else [(np.arange(len(dist)), np.arange(len(dist)))])
    for train, test in folds:
        ta, fa, n_same, n_diff = _rates(dist[train], issame[train], acc_thresholds)
        train_acc = (ta + (n_diff - fa)) / len(train)
        t_best = acc_thresholds[np.argmax(train_acc)]  # first maximum, as np.argmax upstream
        ta, fa, n_same, n_diff = _rates(dist[test], issame[test], np.array([t_best]))
        accuracy.append((ta[0] + n_diff - fa[0]) / len(test))
        best.append(t_best)

        # VAL@FAR: threshold where the train FAR reaches the target, applied to the test fold.
        _, fa, _, n_diff = _rates(dist[train], issame[train], val_thresholds)
        far_train = fa / n_diff if n_diff else np.zeros(len(val_thresholds))
        t_val = interp_step(far_train, val_thresholds, far_target) if far_train.max() >= far_target else 0.0
        ta, fa, n_same, n_diff = _rates(dist[test], issame[test], np.array([t_val]))
        val.append(ta[0] / n_same if n_same else 0.0)  # empty classes count as 0, not a crash
        far.append(fa[0] / n_diff if n_diff else 0.0)
    return {
        "accuracy": float(np.mean(accuracy)),
        "std": float(np.std(accuracy)),
        "thresholds": np.asarray(best),
        "fold_accuracy": np.asarray(accuracy),
        "xnorm": float(norms.mean()),
        "val": float(np.mean(val)),
        "val_std": float(np.std(val)),
        "far": float(np.mean(far)),
    }


def _embed_all(embed_fn, images, batch_size):
    out = [np.asarray(embed_fn(images[i:i + batch_size]), dtype=np.float32)
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out, axis=0)


def _distinct(images):
    """(indices of the first copy of each distinct image, index into them for every image)."""
    first, keep = {}, []
    inverse = np.empty(len(images), dtype=np.int64)
    for i, img in enumerate(images):
        key = hashlib.blake2b(img.tobytes(), digest_size=16).digest()
        if key not in first:
            first[key] = len(keep)
            keep.append(i)
        inverse[i] = first[key]
    return np.asarray(keep, dtype=np.int64), inverse


def flip_embed(embed_fn, images_uint8, batch_size=64, return_parts=False):
    """embed_fn(images) + embed_fn(horizontally flipped images); embed_fn: uint8 NHWC -> [n, d].

    Pair files repeat images (glint4_val: 839 distinct of 2000), so each distinct image is
    embedded once. With return_parts=True returns (plain, flipped) instead of their sum.
    """
    images = np.asarray(images_uint8)
    keep, inverse = _distinct(images)
    distinct = images[keep]
    plain = _embed_all(embed_fn, distinct, batch_size)[inverse]
    flipped = _embed_all(embed_fn, np.ascontiguousarray(distinct[:, :, ::-1]), batch_size)[inverse]
    return (plain, flipped) if return_parts else plain + flipped


def verify_bin(path, embed_fn, batch_size=64, nfolds=10):
    """load_bin + flip_embed + evaluate. Adds `pairs` and `xnorm_single`.

    `xnorm_single` is insightface's XNorm (mean norm of the image and flip embeddings taken
    separately, as arcface_torch logs it); `xnorm` is the norm of their sum, about twice that.
    """
    images, issame = load_bin(path)
    plain, flipped = flip_embed(embed_fn, images, batch_size, return_parts=True)
    result = evaluate(plain + flipped, issame, nfolds=nfolds)
    single = np.linalg.norm(np.concatenate([plain, flipped]).astype(np.float64), axis=1)
    result.update(pairs=len(issame), xnorm_single=float(single.mean()))
    return result
