"""Three steps of the sampled FC head alone (identity backbone) under GraphStep, OneJobStep or EagerStep.

argv: out.json mode optimizer sparse(0|1) [amp(0|1) [steps]]. Rank 0 writes the features, labels and the full
FC weight before and after every step, for a numpy re-computation of the update. mode: graph (TrainGraph's
compiled step, GraphStep, whose update compiles to indexed slices: the path of GPUs; AmpSparseStep under AMP),
onejob (graph mode as build picks it on the CPU in FP32: OneJobStep, the rows updated on the host) or eager.
"""
import json
import sys

import numpy as np

import of_face  # noqa: F401  (loads cuDNN/cuBLAS before OneFlow)
import oneflow as flow
from of_face import parallel
from of_face.config import load_config
from of_face.train.steps import GraphStep
from of_face.train.system import build
from of_face.heads import fc_table

out, mode, opt_name, sparse = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
amp = len(sys.argv) > 5 and sys.argv[5] == "1"
STEPS = int(sys.argv[6]) if len(sys.argv) > 6 else 3
CLASSES, DIM, BATCH, RATE = 61, 8, 4, 0.3  # 31 classes per rank (one padded), 10 kept
cfg = load_config(None, [
    f"Global.mode={'eager' if mode == 'eager' else 'graph'}", "Global.seed=0", f"Model.embedding_size={DIM}",
    "Loss.margin=[1.0, 0.0, 0.35]",
    "Loss.scale=16.0", f"Loss.sample_rate={RATE}", f"Optimizer.name={opt_name}", "Optimizer.lr=0.1",
    "Optimizer.momentum=0.9", "Optimizer.weight_decay=0.01", "Optimizer.clip_grad_norm=0.0",
    f"Optimizer.sparse_fc_update={str(sparse).lower()}", f"Data.batch_size={BATCH // parallel.world_size()}",
    "LRScheduler.power=0", f"AMP.enable={str(amp).lower()}",
])
stepper = GraphStep if mode == "graph" and not (amp and sparse) else None
system = build(cfg, CLASSES, backbone=flow.nn.Identity(), total_steps=STEPS, warmup_steps=0, stepper=stepper)
head, step = system.head, system.step  # (constant LR)
assert mode != "onejob" or type(step).__name__ == "OneJobStep", type(step).__name__
rng = np.random.default_rng(3)
w0 = rng.normal(0, 1, (head.padded_classes, DIM)).astype(np.float32)
with flow.no_grad():
    head.weight.copy_(head.table.from_rows(w0))

r, per_rank = parallel.rank(), BATCH // parallel.world_size()
record = {"k": head.num_sample, "classes": CLASSES, "weights": [w0.tolist()], "x": [], "y": [], "loss": []}
for _ in range(STEPS):
    x = rng.standard_normal((BATCH, DIM)).astype(np.float32)
    y = rng.integers(0, CLASSES, BATCH)
    loss = step(parallel.batch(x[r * per_rank:(r + 1) * per_rank]), parallel.batch(y[r * per_rank:(r + 1) * per_rank]))
    record["loss"].append(float(parallel.to_numpy(loss)))
    record["x"].append(x.tolist())
    record["y"].append(y.tolist())
    record["weights"].append(fc_table.rows(head.weight).tolist())
if mode == "graph":
    jobs = [step.graph] + ([step.fc_graph] if hasattr(step, "fc_graph") else [])  # (AMP + sparse: 2 jobs)
    record["ops"] = [sorted({op.user_conf.op_type_name for op in job._full_job_proto.net.op
                             if op.HasField("user_conf")}) for job in jobs]
if r == 0:
    json.dump(record, open(out, "w"))
