"""1:1 verification maths, pure numpy: flip-test embeddings, K-fold accuracy, VAL@FAR, ROC steps.

Protocol as insightface `eval/verification.py` (and arcface_torch's CallBackVerification):
embedding of image + embedding of its horizontal flip, summed, L2-normalised; squared L2
distance; thresholds 0, 0.01, ..., 3.99; unshuffled K-fold, best threshold on the train folds,
accuracy on the test fold. VAL@FAR=1e-3 uses thresholds in steps of 0.001.

Used by evaluation (of_face.eval) and by the verifier that runs during training
(of_face.train.verify), which both get their embeddings through `flip_embed`.
"""
import hashlib
from typing import Callable, Dict, Tuple, Union

import numpy as np

EmbedFn = Callable[[np.ndarray], np.ndarray]  # uint8 RGB images [n, H, W, 3] -> embeddings [n, d]


def _count_below(sorted_values, thresholds):
    """How many values are strictly below each threshold (insightface predicts same if dist < t)."""
    return np.searchsorted(sorted_values, thresholds, side="left")


def _rates(dist, issame, thresholds):
    """(true accepts, false accepts, n_same, n_diff) for every threshold, vectorised."""
    same = np.sort(dist[issame])
    diff = np.sort(dist[~issame])
    return _count_below(same, thresholds), _count_below(diff, thresholds), len(same), len(diff)


def interp_step(x, y, x0: float) -> float:
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


def evaluate(embeddings, issame, nfolds: int = 10, far_target: float = 1e-3) -> Dict[str, object]:
    """10-fold verification metrics; embeddings [2P, d] (image+flip already summed), issame [P]."""
    from sklearn.model_selection import KFold

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


def _embed_all(embed_fn, images, batch_size, dtype):
    if len(images) == 0:
        return np.asarray(embed_fn(images), dtype=dtype)
    out = [np.asarray(embed_fn(images[i:i + batch_size]), dtype=dtype)
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


def flip_images(images_uint8: np.ndarray) -> np.ndarray:
    """Horizontal mirror of NHWC images (contiguous copy)."""
    return np.ascontiguousarray(np.asarray(images_uint8)[:, :, ::-1])


def flip_embed(embed_fn: EmbedFn, images_uint8: np.ndarray, batch_size: int = 64, return_parts: bool = False,
               dedupe: bool = True, dtype=np.float32) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
    """embed_fn(images) + embed_fn(horizontally flipped images); embed_fn: uint8 NHWC -> [n, d].

    The one flip-test embedding of of_face. Images go to embed_fn in batches of `batch_size`
    (all plain batches, then all flipped ones); outputs are cast to `dtype` before the sum.
    dedupe: embed each distinct image once (pair files repeat images: glint4_val has 839
    distinct of 2000). With return_parts=True returns (plain, flipped) instead of their sum.
    """
    images = np.asarray(images_uint8)
    if dedupe:
        keep, inverse = _distinct(images)
        distinct = images[keep]
        plain = _embed_all(embed_fn, distinct, batch_size, dtype)[inverse]
        flipped = _embed_all(embed_fn, flip_images(distinct), batch_size, dtype)[inverse]
    else:
        plain = _embed_all(embed_fn, images, batch_size, dtype)
        flipped = _embed_all(embed_fn, flip_images(images), batch_size, dtype)
    return (plain, flipped) if return_parts else plain + flipped


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (rows of zeros stay zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
