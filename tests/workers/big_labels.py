"""Two steps of the sampled, sparsely updated FC head (identity backbone) with 2**24 + 8 classes and
labels above 2**24 that float32 would merge (2**24+1 and 2**24+2 both round to 2**24 or 2**24+2).

argv: out.json mode. Rank 0 writes, for every step, the features, labels and loss, the ids of the
FC rows that changed and those rows before and after the step, for a float64 numpy re-computation.
Embedding size 4 keeps the FC weight at 268 MB (plus its momentum).
"""
import json
import sys

import numpy as np

import of_face  # noqa: F401  (loads cuDNN/cuBLAS before OneFlow)
import oneflow as flow
from of_face import parallel
from of_face.config import load_config
from of_face.train.system import build

out, mode = sys.argv[1], sys.argv[2]
BIG = 2 ** 24
CLASSES, DIM, BATCH, RATE = BIG + 8, 4, 4, 1e-5  # 8,388,612 classes per rank, 84 kept
LABELS = [[BIG + 1, BIG + 2, BIG + 1, 3], [BIG + 2, BIG + 3, BIG + 7, BIG]]
cfg = load_config(None, [
    f"Global.mode={mode}", "Global.seed=0", f"Model.embedding_size={DIM}", "Loss.margin=[1.0, 0.0, 0.35]",
    "Loss.scale=4.0", f"Loss.sample_rate={RATE}", "Optimizer.name=sgd", "Optimizer.lr=0.1",
    "Optimizer.momentum=0.9", "Optimizer.weight_decay=0.0", "Optimizer.clip_grad_norm=0.0",
    "Optimizer.sparse_fc_update=true", f"Data.batch_size={BATCH // parallel.world_size()}",
    "LRScheduler.power=0",
])
system = build(cfg, CLASSES, backbone=flow.nn.Identity(), total_steps=len(LABELS), warmup_steps=0)
head, step = system.head, system.step


def fc_rows():
    """The FC weight as [classes, dim] whatever its layout: [C', d], or [local, world, d] (rank r
    holds column r, its classes r*local + j)."""
    arr = parallel.to_numpy(head.weight)
    if arr.ndim == 3:
        return arr.transpose(1, 0, 2).reshape(-1, arr.shape[-1])
    return arr


r, per_rank = parallel.rank(), BATCH // parallel.world_size()
rng = np.random.default_rng(5)
record = {"k": head.num_sample, "classes": CLASSES, "steps": []}
before = fc_rows()
for y in LABELS:
    x = rng.standard_normal((BATCH, DIM)).astype(np.float32)
    y = np.array(y, np.int64)
    loss = step(parallel.batch(x[r * per_rank:(r + 1) * per_rank]),
                parallel.batch(y[r * per_rank:(r + 1) * per_rank]))
    loss = float(parallel.to_numpy(loss))
    after = fc_rows()
    if r == 0:
        changed = np.flatnonzero(np.any(after != before, axis=1))
        record["steps"].append({"x": x.tolist(), "y": y.tolist(), "loss": loss, "changed": changed.tolist(),
                                "before": before[changed].tolist(), "after": after[changed].tolist(),
                                "rows": len(after)})
    before = after
if r == 0:
    json.dump(record, open(out, "w"))
