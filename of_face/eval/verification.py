"""1:1 verification of an embedder on insightface .bin pair files (LFW, CFP-FP, AgeDB-30, ...).

`verify_bin` = read the .bin (`of_face.data.verification_bin`) + flip-test embeddings and the
10-fold protocol (`of_face.scoring`, which documents it). The names below are re-exported from
those two modules for the evaluation code and its users.
"""
import numpy as np

from of_face.data.verification_bin import load_bin, read_bin_entries  # noqa: F401  (re-exported)
from of_face.scoring import evaluate, flip_embed, interp_step  # noqa: F401  (re-exported)

__all__ = ["evaluate", "flip_embed", "interp_step", "load_bin", "read_bin_entries", "verify_bin"]


def verify_bin(path, embed_fn, batch_size: int = 64, nfolds: int = 10) -> dict:
    """load_bin + flip_embed + evaluate. Adds `pairs` and `xnorm_single`.

    `xnorm_single` is insightface's XNorm (mean norm of the image and flip embeddings taken
    separately, as arcface_torch logs it); `xnorm` is the norm of their sum, about twice that.
    """
    images, issame = load_bin(path)
    if len(issame) < nfolds:  # KFold's own message would not name the file
        raise ValueError(f"{path}: {len(issame)} pairs; the {nfolds}-fold protocol needs at least {nfolds}")
    plain, flipped = flip_embed(embed_fn, images, batch_size, return_parts=True)
    result = evaluate(plain + flipped, issame, nfolds=nfolds)
    single = np.linalg.norm(np.concatenate([plain, flipped]).astype(np.float64), axis=1)
    result.update(pairs=len(issame), xnorm_single=float(single.mean()))
    return result
