"""P2: the FC part alone (features in, loss out, update) at large class counts, 2 ranks.

    python -m oneflow.distributed.launch --nproc_per_node 2 bench/fc_part.py CLASSES RATE SPARSE [DIM] [BATCH]

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

import numpy as np

import of_face  # noqa: F401
import oneflow as flow
from of_face import parallel
from of_face.config import OptimizerCfg
from of_face.heads.partial_fc import PartialFC
from of_face.train.optim import build_optimizer, sparse_fc_options
from of_face.train.steps import STEPPERS

classes, rate, sparse = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3] == "1"
dim = int(sys.argv[4]) if len(sys.argv) > 4 else 512
batch = int(sys.argv[5]) if len(sys.argv) > 5 else 128  # global
steps = int(os.environ.get("FC_STEPS", 3))  # timed steps (after 2 warm-up)
cfg = OptimizerCfg(lr=0.1, momentum=0.9, weight_decay=5e-4)
head = PartialFC(classes, dim, margin=(1.0, 0.5, 0.0), scale=64.0, sample_rate=rate, global_batch=batch,
                 sparse_update=sparse)
fc_options, head.row_decay = sparse_fc_options(cfg) if head.sparse_update else ({}, 0.0)
backbone = parallel.broadcast_module(flow.nn.Identity())
optimizer = build_optimizer(cfg, backbone, head.parameters(), fc_options)
scheduler = flow.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=1)
step = STEPPERS["graph"](backbone, head, optimizer, scheduler)

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
                  "batch": batch, "kept_per_rank": head.num_sample, "s_per_step": round(seconds, 4),
                  "peak_rss_gib": round(rss, 2), "loss": last}), flush=True)
