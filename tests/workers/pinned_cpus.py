"""Each rank's CPU affinity after `build` (Global.pin_cpus, parallel.pin_local_cpus), 2 ranks.

argv: out.json PIN (true|false). Rank r writes out.json.<r>: {"before": [cpus], "threads": {tid: [cpus]}}
(every thread of the process, read after a compiled step ran: its threads were started by then).
"""
import json
import os
import sys

import numpy as np

import of_face  # noqa: F401  (loads cuDNN/cuBLAS before OneFlow)
import oneflow as flow
from of_face import parallel
from of_face.config import load_config
from of_face.train.system import build

before = sorted(os.sched_getaffinity(0))
cfg = load_config(None, ["Global.device=cpu", "Model.embedding_size=8", "Data.batch_size=4",
                         f"Global.pin_cpus={sys.argv[2]}"])
system = build(cfg, 20, backbone=flow.nn.Identity(), total_steps=1, warmup_steps=0)
rng = np.random.default_rng(0)
x, y = rng.standard_normal((4, 8)).astype(np.float32), rng.integers(0, 20, 4)
parallel.to_numpy(system.step(parallel.batch(x), parallel.batch(y)))
threads = {tid: sorted(os.sched_getaffinity(int(tid))) for tid in os.listdir("/proc/self/task")}
with open(f"{sys.argv[1]}.{parallel.rank()}", "w") as f:
    json.dump({"before": before, "threads": threads}, f)
