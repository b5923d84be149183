"""Four optimizer steps of a Linear backbone + class-split head with k-step gradient accumulation.

argv: out.json mode accum_steps. Every optimizer step sees the same 16 samples whatever k is
(k micro-batches of 16/k per step); rank 0 writes the losses and the final weights.
"""
import json
import sys

import numpy as np

import of_face  # noqa: F401
import oneflow as flow
from of_face import parallel
from of_face.config import load_config
from of_face.train.system import build
from of_face.heads import fc_table

out, mode, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
CLASSES, DIM, GLOBAL_BATCH, STEPS = 21, 8, 16, 4
world, r = parallel.world_size(), parallel.rank()
per_rank, micro = GLOBAL_BATCH // world, GLOBAL_BATCH // world // k
rng = np.random.default_rng(0)
linear = flow.nn.Linear(DIM, DIM)
with flow.no_grad():
    linear.weight.copy_(flow.tensor(rng.normal(0, 0.3, (DIM, DIM)).astype(np.float32)))
    linear.bias.zero_()
cfg = load_config(None, [
    f"Global.mode={mode}", "Global.seed=0", f"Model.embedding_size={DIM}", "Loss.margin=[1.0, 0.5, 0.0]",
    "Loss.scale=16.0", "Optimizer.lr=0.2", "Optimizer.momentum=0.9", "Optimizer.weight_decay=5e-4",
    "Optimizer.clip_grad_norm=0.0", "Optimizer.sparse_fc_update=false", f"Optimizer.accum_steps={k}",
    f"Data.batch_size={micro}", "LRScheduler.power=2.0",
])
system = build(cfg, CLASSES, backbone=linear, total_steps=STEPS, warmup_steps=2)  # LR differs every step
backbone, head, step = system.backbone, system.head, system.step
with flow.no_grad():
    head.weight.copy_(head.table.from_rows(rng.normal(0, 1, (head.padded_classes, DIM)).astype(np.float32)))

losses = []
for _ in range(STEPS):
    x = rng.standard_normal((GLOBAL_BATCH, DIM)).astype(np.float32)
    y = rng.integers(0, CLASSES, GLOBAL_BATCH)
    # rank-major global batch; with k micro-batches rank r's shard is its k pieces back to back
    loss = step(parallel.batch(x[r * per_rank:(r + 1) * per_rank]), parallel.batch(y[r * per_rank:(r + 1) * per_rank]))
    losses.append(float(parallel.to_numpy(loss)))
result = {"losses": losses, "fc": fc_table.rows(head.weight).tolist(),
          "linear": parallel.to_numpy(backbone.weight).tolist()}
if r == 0:
    json.dump(result, open(out, "w"))
