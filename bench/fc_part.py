"""P2: the FC part alone (features in, loss out, update) at large class counts, 2 ranks.

    python -m oneflow.distributed.launch --nproc_per_node 2 bench/fc_part.py CLASSES RATE SPARSE [DIM] [BATCH]

FC_CHUNKS (an integer K or auto; default 1) and FC_MEMORY_GIB (auto's per-rank budget; default:
the config's) stream the head in K class chunks (heads/streamed.py), so one command measures any K.
FC_STEPPER=graph: K = 1 as TrainGraph's single step (GraphStep; build picks OneJobStep here, the
streamed passes as one job), to compare the two. FC_OPTIMIZER: sgd (default, momentum 0.9) or adamw.
FC_PIN_CPUS: Global.pin_cpus (default true here).
Each JSON line also carries the K run and
heads/memory.py's predicted peak per rank for it (docs/BENCHMARKS.md, P2d, compares the two).
FC_TALLY=1: rank 0 also prints, per compiled job, its buffers as bytes per element of the formula's
shapes (heads/memory.py `coefficients`: where its integer coefficients come from).

One compiled step = all-gather of the features, (PartialFC sampling), cosine matmul, margin,
softmax cross-entropy, backward and the SGD-momentum update of the FC weight (dense, or sparse:
only kept rows). The backbone is the identity, so nothing else is timed. 2 warm-up steps (graph
compilation), then timed steps; every rank prints one JSON line with seconds/step and its
peak RSS (ru_maxrss). Run each configuration in its own launch: peak RSS only grows.
`bench/fc_part_all.sh` runs the grid of docs/BENCHMARKS.md.
"""
import json
import os
import resource
import sys
import time
from dataclasses import replace

import numpy as np

import of_face  # noqa: F401
import oneflow as flow
from of_face import parallel
from of_face.config import load_config
from of_face.heads.memory import HeadShape, coefficients, memory_of, predicted_gib
from of_face.train.steps import GraphStep
from of_face.train.system import build

classes, rate, sparse = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3] == "1"
dim = int(sys.argv[4]) if len(sys.argv) > 4 else 512
batch = int(sys.argv[5]) if len(sys.argv) > 5 else 128  # global
steps = int(os.environ.get("FC_STEPS", 3))  # timed steps (after 2 warm-up)
chunks = os.environ.get("FC_CHUNKS", "1")
memory = os.environ.get("FC_MEMORY_GIB", "0")
optimizer = os.environ.get("FC_OPTIMIZER", "sgd")
cfg = load_config(None, [
    "Global.mode=graph", "Global.seed=0", f"Model.embedding_size={dim}", "Loss.margin=[1.0, 0.5, 0.0]",
    "Loss.scale=64.0", f"Loss.sample_rate={rate}", f"Optimizer.name={optimizer}", "Optimizer.lr=0.1",
    "Optimizer.momentum=0.9", "Optimizer.weight_decay=5e-4", f"Optimizer.sparse_fc_update={str(sparse).lower()}",
    f"Data.batch_size={batch // parallel.world_size()}", "LRScheduler.power=0",  # constant LR
    f"Loss.fc_chunks={chunks}", f"Loss.fc_memory_gib={memory}",
    f"Global.pin_cpus={os.environ.get('FC_PIN_CPUS', 'true')}",  # the FC-bound setting (docs/BENCHMARKS.md P2e)
])
stepper = GraphStep if os.environ.get("FC_STEPPER") == "graph" else None
system = build(cfg, classes, backbone=flow.nn.Identity(), total_steps=2 + steps, warmup_steps=0, stepper=stepper)
head, step = system.head, system.step
run = memory_of(cfg, head, batch, getattr(getattr(step, "plan", None), "chunks", 1), embedding_grad=False)
if stepper is GraphStep:  # (the prediction of the step run, not of the one build would pick)
    shape = replace(HeadShape.of(cfg, head, batch, embedding_grad=False), one_job=False)
    run = replace(run, predicted_gib=predicted_gib(shape, 1))

rng = np.random.default_rng(0)
per_rank = batch // parallel.world_size()
batches = [(parallel.batch(rng.standard_normal((per_rank, dim)).astype(np.float32)),
            parallel.batch(rng.integers(0, classes, per_rank))) for _ in range(2 + steps)]  # fresh each step
for x, y in batches[:2]:
    parallel.to_numpy(step(x, y))
start = time.time()
for x, y in batches[2:]:
    loss = step(x, y)
    parallel.to_numpy(loss)  # one step at a time: the host noise of the next step is not the bottleneck
seconds = (time.time() - start) / steps
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB, this rank
last = round(float(parallel.to_numpy(loss)), 4)
print(json.dumps({"rank": parallel.rank(), "classes": classes, "rate": rate, "sparse": head.sparse_update, "dim": dim,
                  "batch": batch, "kept_per_rank": head.num_sample, "optimizer": optimizer, "fc_chunks": run.chunks,
                  "stepper": type(step).__name__,
                  "s_per_step": round(seconds, 4), "peak_rss_gib": round(rss, 3),
                  "predicted_gib": round(run.predicted_gib, 3), "budget_gib": round(run.budget_gib, 2), "loss": last}),
      flush=True)
if os.environ.get("FC_TALLY") == "1":  # on every rank (rank 0 alone hung the launch at exit), rank 0 prints
    shape = HeadShape.of(cfg, head, batch, embedding_grad=False)
    jobs = getattr(step, "graphs", None) or [step.graph]
    counts = {type(g).__name__: coefficients(g, shape, run.chunks) for g in jobs}
    if parallel.rank() == 0:
        print(json.dumps({"tally": {job: {k: round(v, 1) for k, v in c.items()} for job, c in counts.items()}}),
              flush=True)
