"""N training steps of a tiny IResNet + class-split head on fixed random batches; report losses.

argv: out.json mode steps [sample_rate [classes]]. Rank 0 writes {"losses": [...], "fc_sum": ..., "backbone_sum": ...}.
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

out, mode, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
rate = float(sys.argv[4]) if len(sys.argv) > 4 else 1.0
CLASSES = int(sys.argv[5]) if len(sys.argv) > 5 else 21
GLOBAL_BATCH = 16
cfg = load_config(None, [
    f"Global.mode={mode}", "Global.seed=0", "Model.name=iresnet", "Model.layers=[1, 1, 1, 1]", "Model.width=4",
    "Model.embedding_size=16", "Loss.margin=[1.0, 0.0, 0.35]", "Loss.scale=16.0", f"Loss.sample_rate={rate}",
    "Optimizer.lr=0.1", "Optimizer.momentum=0.9", "Optimizer.weight_decay=5e-4", "Optimizer.sparse_fc_update=false",
    f"Data.batch_size={GLOBAL_BATCH // parallel.world_size()}", "LRScheduler.power=2.0",
])
system = build(cfg, CLASSES, total_steps=steps, warmup_steps=2)
backbone, head, step = system.backbone, system.head, system.step
with flow.no_grad():
    head.weight.copy_(head.table.from_rows(
        np.random.default_rng(1).normal(0, 0.01, (head.padded_classes, 16)).astype(np.float32)))

rng = np.random.default_rng(0)
per_rank, r = GLOBAL_BATCH // parallel.world_size(), parallel.rank()
losses = []
for _ in range(steps):
    x = rng.standard_normal((GLOBAL_BATCH, 3, 112, 112)).astype(np.float32)
    y = rng.integers(0, CLASSES, GLOBAL_BATCH)
    loss = step(parallel.batch(x[r * per_rank:(r + 1) * per_rank]), parallel.batch(y[r * per_rank:(r + 1) * per_rank]))
    losses.append(float(parallel.to_numpy(loss)))
fc = fc_table.rows(head.weight)
bb = sum(float(np.abs(parallel.to_numpy(p)).sum()) for p in backbone.parameters())
if r == 0:
    json.dump({"losses": losses, "fc_sum": float(np.abs(fc).sum()), "backbone_sum": bb}, open(out, "w"))
