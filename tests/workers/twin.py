"""20 training steps through the trainer's own builders: PartialFC r=0.5 + SparseMomentum.

argv: out.json mode backbone(iresnet|mlp) [overrides]. Rank 0 writes the losses and the final FC
weight; every rank writes its own copy of the backbone to out.json.rank<r>.npz (replicas must agree).
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

out, mode, kind = sys.argv[1], sys.argv[2], sys.argv[3]
CLASSES, PER_RANK = 101, 8
STEPS = 20 if kind == "mlp" else 6
cfg = load_config("configs/default.yaml", [f"Global.mode={mode}", "Loss.sample_rate=0.5", "Model.embedding_size=16",
                                           "Optimizer.sparse_fc_update=true", "Model.width=4",
                                           f"Data.batch_size={PER_RANK}", *sys.argv[4:]])
rng = np.random.default_rng(0)
if kind == "mlp":  # no BatchNorm
    flow.manual_seed(0)
    net = flow.nn.Sequential(flow.nn.Flatten(), flow.nn.Linear(3 * 16 * 16, 32), flow.nn.PReLU(32),
                             flow.nn.Linear(32, 16))
    size = 16
else:
    net, size = None, 112  # built by build() from cfg.Model
system = build(cfg, CLASSES, backbone=net, total_steps=STEPS, warmup_steps=4)
backbone, head, step = system.backbone, system.head, system.step
assert head.sparse_update

world, r = parallel.world_size(), parallel.rank()
centres = rng.normal(0, 1, (CLASSES, 3, size, size)).astype(np.float32)
losses = []
for _ in range(STEPS):
    y = rng.integers(0, CLASSES, PER_RANK * world)
    x = (centres[y] + rng.normal(0, 0.5, (len(y), 3, size, size))).astype(np.float32)
    s = slice(r * PER_RANK, (r + 1) * PER_RANK)
    losses.append(float(parallel.to_numpy(step(parallel.batch(x[s]), parallel.batch(y[s])))))
np.savez(f"{out}.rank{r}.npz", **{n: p.to_local().numpy() for n, p in backbone.named_parameters()})
result = {"losses": losses, "fc": fc_table.rows(head.weight).tolist()}
if r == 0:
    json.dump(result, open(out, "w"))
