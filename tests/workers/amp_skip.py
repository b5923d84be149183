"""AMP in graph mode on 2 ranks: a step whose gradients are non-finite on one rank only.

argv: out_prefix. Step 2 feeds infinite images on rank 1 alone. Every rank writes
<out_prefix>.<rank>.json: per step, whether its own backbone copy and FC shard changed, the loss
and the grad scale read from the graph after the step.
"""
import json
import sys

import numpy as np

import of_face  # noqa: F401
import oneflow as flow
from of_face import parallel
from of_face.config import AMPCfg, ModelCfg, OptimizerCfg
from of_face.heads.partial_fc import PartialFC
from of_face.models import build_backbone
from of_face.train.optim import build_optimizer, build_scheduler
from of_face.train.steps import STEPPERS

out = sys.argv[1]
flow.manual_seed(0)
backbone = parallel.broadcast_module(
    build_backbone(ModelCfg(name="iresnet", layers=[1, 1, 1, 1], width=4, embedding_size=16)))
head = PartialFC(21, 16, margin=(1.0, 0.0, 0.35), scale=16.0)
optimizer = build_optimizer(OptimizerCfg(lr=0.1), backbone, head.parameters())
scheduler = build_scheduler(optimizer, total_steps=100, warmup_steps=0, power=1.0)
step = STEPPERS["graph"](backbone, head, optimizer, scheduler, AMPCfg(enable=True, init_scale=1024.0))


def local_params():
    return [p.to_local().numpy().copy() for p in list(backbone.parameters()) + [head.weight]]


rng = np.random.default_rng(0)
r, per_rank = parallel.rank(), 4
record = []
for i in range(3):
    x = rng.standard_normal((2 * per_rank, 3, 112, 112)).astype(np.float32)[r * per_rank:(r + 1) * per_rank]
    y = rng.integers(0, 21, 2 * per_rank)[r * per_rank:(r + 1) * per_rank]
    if i == 1 and r == 1:
        x[:] = np.inf
    before = local_params()
    loss = step(parallel.batch(x), parallel.batch(y))
    after = local_params()
    record.append({
        "changed": [bool(np.any(a != b)) for a, b in zip(after, before)],
        "loss": float(parallel.to_numpy(loss)),
        "scale": step.loss_scale(),
    })
json.dump(record, open(f"{out}.{r}.json", "w"))
