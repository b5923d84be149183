"""P1 (first part): training-step throughput of a small IResNet + class-split head.

    python -m oneflow.distributed.launch --nproc_per_node N bench/step_speed.py MODE WIDTH PER_RANK_BATCH [CLASSES [AMP]]

AMP = 1 turns on graph-mode AMP (FP16 autocast + dynamic loss scale).

Runs 3 warm-up steps (graph compilation) then 8 timed steps on a fixed random batch and prints
samples/s over all ranks. Results go to docs/BENCHMARKS.md.
"""
import sys
import time

import numpy as np

import of_face  # noqa: F401
import oneflow as flow
from of_face import parallel
from of_face.config import AMPCfg, ModelCfg, OptimizerCfg
from of_face.heads.partial_fc import PartialFC
from of_face.models import build_backbone
from of_face.train.optim import build_optimizer
from of_face.train.steps import STEPPERS

mode, width, per_rank = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
classes = int(sys.argv[4]) if len(sys.argv) > 4 else 200
amp = len(sys.argv) > 5 and sys.argv[5] == "1"
flow.manual_seed(0)
backbone = parallel.broadcast_module(
    build_backbone(ModelCfg(name="iresnet", layers=[1, 1, 1, 1], width=width, embedding_size=128)))
head = PartialFC(classes, 128, margin=(1.0, 0.0, 0.1), scale=16.0)
optimizer = build_optimizer(OptimizerCfg(lr=0.1), backbone, head.parameters())
scheduler = flow.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=1)
step = STEPPERS[mode](backbone, head, optimizer, scheduler, AMPCfg(enable=amp))

rng = np.random.default_rng(0)
x = parallel.batch(rng.standard_normal((per_rank, 3, 112, 112)).astype(np.float32))
y = parallel.batch(rng.integers(0, classes, per_rank))
for _ in range(3):
    parallel.to_numpy(step(x, y))
start, n = time.time(), 8
for _ in range(n):
    loss = step(x, y)
parallel.to_numpy(loss)
seconds = time.time() - start
if parallel.rank() == 0:
    world = parallel.world_size()
    print(f"{mode}{' AMP' if amp else ''} width {width} batch {per_rank}/rank x {world} rank(s): "
          f"{n * per_rank * world / seconds:.1f} samples/s", flush=True)
