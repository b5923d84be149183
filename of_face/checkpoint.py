"""Backbone checkpoints: one `.npz` of the state dict, written to a temp name then renamed.

A crash mid-write leaves the previous file intact. Backbone tensors are broadcast, so rank 0's
local copy is the whole tensor; other ranks write nothing.
"""
import os

import numpy as np
import oneflow as flow

from of_face import parallel

BACKBONE_FILE = "backbone.npz"


def save_backbone(backbone, out_dir, step):
    path = os.path.join(out_dir, BACKBONE_FILE)
    state = {k: (v.to_local() if v.is_global else v).numpy() for k, v in backbone.state_dict().items()}
    if parallel.rank() == 0:
        tmp = os.path.join(out_dir, f".{BACKBONE_FILE}.tmp{os.getpid()}.npz")
        np.savez(tmp, __step__=np.int64(step), **state)
        os.replace(tmp, path)
    parallel.barrier()
    return path


def load_backbone(backbone, path):
    """Load a saved backbone into a local (not yet placed) module; names a mismatch clearly."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with np.load(path) as f:
            state = {k: f[k] for k in f.files if k != "__step__"}
    except Exception as e:  # zipfile/pickle errors of a cut or foreign file
        raise ValueError(f"{path}: not a readable of_face backbone checkpoint ({e})") from None
    own = backbone.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and tuple(own[k].shape) != state[k].shape]
    if missing or extra or wrong:
        raise ValueError(
            f"{path}: does not match the configured backbone (missing {missing[:3]}, unexpected {extra[:3]}, "
            f"shape mismatch {wrong[:3]})"
        )
    backbone.load_state_dict({k: flow.tensor(v) for k, v in state.items()})
    return backbone
