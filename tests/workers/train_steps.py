"""N training steps of a tiny IResNet + class-split head on fixed random batches; report losses.

argv: out.json mode steps [sample_rate [classes]]. Rank 0 writes {"losses": [...], "fc_sum": ..., "backbone_sum": ...}.
"""
import json
import sys

import numpy as np

import of_face  # noqa: F401
import oneflow as flow
from of_face import parallel
from of_face.config import ModelCfg, OptimizerCfg
from of_face.heads.partial_fc import PartialFC
from of_face.models import build_backbone
from of_face.train.optim import build_optimizer, build_scheduler
from of_face.train.steps import STEPPERS

out, mode, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
rate = float(sys.argv[4]) if len(sys.argv) > 4 else 1.0
CLASSES = int(sys.argv[5]) if len(sys.argv) > 5 else 21
GLOBAL_BATCH = 16
flow.manual_seed(0)
backbone = parallel.broadcast_module(
    build_backbone(ModelCfg(name="iresnet", layers=[1, 1, 1, 1], width=4, embedding_size=16)))
head = PartialFC(CLASSES, 16, margin=(1.0, 0.0, 0.35), scale=16.0, sample_rate=rate)
head.weight = flow.nn.Parameter(parallel.fc_weight(
    np.random.default_rng(1).normal(0, 0.01, (head.padded_classes, 16)).astype(np.float32)))
optimizer = build_optimizer(OptimizerCfg(lr=0.1, momentum=0.9, weight_decay=5e-4), backbone, head.parameters())
scheduler = build_scheduler(optimizer, total_steps=steps, warmup_steps=2, power=2.0)
step = STEPPERS[mode](backbone, head, optimizer, scheduler)

rng = np.random.default_rng(0)
per_rank, r = GLOBAL_BATCH // parallel.world_size(), parallel.rank()
losses = []
for _ in range(steps):
    x = rng.standard_normal((GLOBAL_BATCH, 3, 112, 112)).astype(np.float32)
    y = rng.integers(0, CLASSES, GLOBAL_BATCH)
    loss = step(parallel.batch(x[r * per_rank:(r + 1) * per_rank]), parallel.batch(y[r * per_rank:(r + 1) * per_rank]))
    losses.append(float(parallel.to_numpy(loss)))
fc = parallel.to_numpy(head.weight)
bb = sum(float(np.abs(parallel.to_numpy(p)).sum()) for p in backbone.parameters())
if r == 0:
    json.dump({"losses": losses, "fc_sum": float(np.abs(fc).sum()), "backbone_sum": bb}, open(out, "w"))
