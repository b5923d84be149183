"""P1 (first part): training-step throughput of a small IResNet + class-split head.

    python -m oneflow.distributed.launch --nproc_per_node N \\
        bench/step_speed.py MODE WIDTH PER_RANK_BATCH [CLASSES [AMP]]

AMP = 1 turns on graph-mode AMP (FP16 autocast + dynamic loss scale). FC_RATE (PartialFC's
sample rate, default 1.0; below 1 with sparse updates) and FC_CHUNKS (Loss.fc_chunks, default 1)
measure what streaming the head costs a real backbone (its forward recomputed). FC_STEPPER=graph
runs K = 1 as TrainGraph's single step (GraphStep) where build would pick OneJobStep (CPU, FP32,
sparse updates: the streamed passes as one job), so the two K = 1 steps can be compared.

Runs 3 warm-up steps (graph compilation) then 8 timed steps on a fixed random batch and prints
samples/s over all ranks. Results go to docs/BENCHMARKS.md.
"""
import os
import sys
import time

import numpy as np

import of_face  # noqa: F401
from of_face import parallel
from of_face.config import load_config
from of_face.train.steps import GraphStep
from of_face.train.system import build

mode, width, per_rank = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
classes = int(sys.argv[4]) if len(sys.argv) > 4 else 200
amp = len(sys.argv) > 5 and sys.argv[5] == "1"
rate = float(os.environ.get("FC_RATE", "1.0"))
cfg = load_config(None, [
    f"Global.mode={mode}", "Global.seed=0", "Model.name=iresnet", "Model.layers=[1, 1, 1, 1]", f"Model.width={width}",
    "Model.embedding_size=128", "Loss.margin=[1.0, 0.0, 0.1]", "Loss.scale=16.0", "Optimizer.lr=0.1",
    f"Optimizer.sparse_fc_update={str(rate < 1).lower()}", f"Data.batch_size={per_rank}",
    "LRScheduler.power=0", f"AMP.enable={str(amp).lower()}",  # constant LR
    f"Loss.sample_rate={rate}", f"Loss.fc_chunks={os.environ.get('FC_CHUNKS', '1')}",
])
stepper = GraphStep if os.environ.get("FC_STEPPER") == "graph" else None
step = build(cfg, classes, total_steps=11, warmup_steps=0, stepper=stepper).step

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
    print(f"{mode}{' AMP' if amp else ''} {type(step).__name__} width {width} batch {per_rank}/rank x {world} rank(s): "
          f"{n * per_rank * world / seconds:.1f} samples/s", flush=True)
