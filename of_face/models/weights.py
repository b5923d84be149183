"""`backbone.npz`: a backbone's parameters and buffers alone (what export, `of-face embed`, the eval
tools and `Global.pretrained` read), written atomically by rank 0.

`load_backbone` also takes insightface / arcface_torch weights directly (`.pth`, `.pt`, `.onnx`),
imported on the fly by models/interop.py, so `Global.pretrained` can name a zoo model.
"""
import os
from typing import Dict, List, Tuple

import numpy as np
import oneflow as flow

from of_face import parallel
from of_face.io import atomic_write
from of_face.oneflow_compat import sync
from of_face.models.interop import import_state, is_foreign

BACKBONE_FILE = "backbone.npz"


def save_backbone(backbone: flow.nn.Module, out_dir: str, step: int) -> str:
    path = os.path.join(out_dir, BACKBONE_FILE)
    sync()  # every queued step done (as nn.Graph.state_dict() does)
    state = {k: (v.to_local() if v.is_global else v).numpy() for k, v in backbone.state_dict().items()}
    if parallel.rank() == 0:
        write_backbone(state, path, step)
    parallel.barrier()
    return path


def write_backbone(state: Dict[str, np.ndarray], path: str, step: int = 0) -> str:
    """{name: array} -> a backbone.npz at `path`, atomically (one process)."""
    with atomic_write(path) as fh:
        np.savez(fh, **state, __step__=np.int64(step))
    return path


def state_mismatch(own: dict, saved: dict) -> Tuple[List[str], List[str], List[str]]:
    """{name: shape} of the model and of a file -> (missing, unexpected, shape-mismatched) names."""
    missing = sorted(set(own) - set(saved))
    extra = sorted(set(saved) - set(own))
    wrong = [k for k in own if k in saved and tuple(saved[k]) != tuple(own[k])]
    return missing, extra, wrong


def load_backbone(backbone: flow.nn.Module, path: str) -> flow.nn.Module:
    """Load a saved backbone (backbone.npz, or an insightface .pth/.onnx imported on the fly) into a
    local (not yet placed) module; names a mismatch clearly (ValueError)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if is_foreign(path):
        backbone.load_state_dict({k: flow.tensor(v) for k, v in import_state(path, backbone).items()})
        return backbone
    try:
        with np.load(path) as f:
            state = {k: f[k] for k in f.files if k != "__step__"}
    except Exception as e:  # zipfile/pickle errors of a cut or foreign file
        raise ValueError(f"{path}: not a readable of_face backbone checkpoint ({e})") from None
    return load_backbone_state(backbone, state, path)


def load_backbone_state(backbone: flow.nn.Module, state: dict, source: str) -> flow.nn.Module:
    """Load {name: numpy} (a backbone.npz's or a training checkpoint's backbone) into a local
    module; a mismatch names `source` and the first differing names."""
    missing, extra, wrong = state_mismatch({k: v.shape for k, v in backbone.state_dict().items()},
                                           {k: v.shape for k, v in state.items()})
    if missing or extra or wrong:
        raise ValueError(
            f"{source}: does not match the configured backbone (missing {missing[:3]}, unexpected {extra[:3]}, "
            f"shape mismatch {wrong[:3]})"
        )
    backbone.load_state_dict({k: flow.tensor(v) for k, v in state.items()})
    return backbone
