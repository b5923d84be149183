"""Host random states a checkpoint carries: OneFlow's default generators and numpy's global one.

Returned as (arrays, JSON-able metadata) so the checkpoint file format stays the checkpoint's
business. Random ops inside a compiled step keep their state in OneFlow's kernels, out of reach.
"""
import random
from typing import Dict, Tuple

import numpy as np
import oneflow as flow


def rng_states() -> Tuple[Dict[str, np.ndarray], dict]:
    # CPU generator only: OneFlow 0.9.0 has no CUDA generator state API (flow.cuda offers
    # manual_seed/manual_seed_all, nothing to read a state back), and the random ops of a step
    # restart their stream on resume anyway (module docstring)
    states = {"rng/flow_cpu": flow.default_generator.get_state().numpy()}
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states["rng/numpy_keys"] = keys
    return states, {"numpy": [kind, int(pos), int(has_gauss), float(cached)], "python": repr(random.getstate())}


def set_rng_states(arrays, meta: dict) -> None:
    if "rng/flow_cpu" in arrays:
        flow.default_generator.set_state(flow.tensor(arrays["rng/flow_cpu"]))
    rng = meta.get("rng", {})
    if "numpy" in rng and "rng/numpy_keys" in arrays:
        kind, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((kind, arrays["rng/numpy_keys"], pos, has_gauss, cached))
