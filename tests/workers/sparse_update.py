"""Three steps of the sampled FC head alone (identity backbone) under GraphStep or EagerStep.

argv: out.json mode optimizer sparse(0|1) [amp(0|1)]. Rank 0 writes the features, labels and the full
FC weight before and after every step, for a numpy re-computation of the update.
"""
import json
import sys

import numpy as np

import of_face  # noqa: F401  (loads cuDNN/cuBLAS before OneFlow)
import oneflow as flow
from of_face import parallel
from of_face.config import AMPCfg, OptimizerCfg
from of_face.heads.partial_fc import PartialFC
from of_face.train.optim import build_optimizer, sparse_fc_options
from of_face.train.steps import STEPPERS

out, mode, opt_name, sparse = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
amp = len(sys.argv) > 5 and sys.argv[5] == "1"
CLASSES, DIM, BATCH, RATE, STEPS = 61, 8, 4, 0.3, 3  # 31 classes per rank (one padded), 10 kept
cfg = OptimizerCfg(name=opt_name, lr=0.1, momentum=0.9, weight_decay=0.01, clip_grad_norm=0.0)
flow.manual_seed(0)
head = PartialFC(CLASSES, DIM, margin=(1.0, 0.0, 0.35), scale=16.0, sample_rate=RATE, global_batch=BATCH,
                 sparse_update=sparse)
fc_options, head.row_decay = sparse_fc_options(cfg) if sparse else ({}, 0.0)
rng = np.random.default_rng(3)
w0 = rng.normal(0, 1, (head.padded_classes, DIM)).astype(np.float32)
head.weight = flow.nn.Parameter(parallel.fc_weight(w0))
backbone = parallel.broadcast_module(flow.nn.Identity())
optimizer = build_optimizer(cfg, backbone, head.parameters(), fc_options)
scheduler = flow.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=1)
step = STEPPERS[mode](backbone, head, optimizer, scheduler, AMPCfg(enable=amp))

r, per_rank = parallel.rank(), BATCH // parallel.world_size()
record = {"k": head.num_sample, "classes": CLASSES, "weights": [w0.tolist()], "x": [], "y": [], "loss": []}
for _ in range(STEPS):
    x = rng.standard_normal((BATCH, DIM)).astype(np.float32)
    y = rng.integers(0, CLASSES, BATCH)
    loss = step(parallel.batch(x[r * per_rank:(r + 1) * per_rank]), parallel.batch(y[r * per_rank:(r + 1) * per_rank]))
    record["loss"].append(float(parallel.to_numpy(loss)))
    record["x"].append(x.tolist())
    record["y"].append(y.tolist())
    record["weights"].append(parallel.to_numpy(head.weight).tolist())
if mode == "graph":
    record["ops"] = sorted({op.user_conf.op_type_name for op in step.graph._full_job_proto.net.op
                            if op.HasField("user_conf")})
if r == 0:
    json.dump(record, open(out, "w"))
