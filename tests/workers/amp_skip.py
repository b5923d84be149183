"""AMP in graph mode on 2 ranks: a step whose gradients are non-finite on one rank only.

argv: out_prefix [sparse(0|1) [amp(0|1)]]. Step 2 feeds infinite images on rank 1 alone. Every rank
writes <out_prefix>.<rank>.json: per step, whether its own backbone copy and FC shard changed, the
loss, the grad scale read from the graph after the step, and the whole FC weight after step 1.
sparse=1: PartialFC (r 0.5) with sparse FC updates (train/amp_sparse.py under AMP).
"""
import json
import sys

import numpy as np

import of_face  # noqa: F401
from of_face import parallel
from of_face.config import load_config
from of_face.train.system import build
from of_face.heads import fc_table

out = sys.argv[1]
sparse = len(sys.argv) > 2 and sys.argv[2] == "1"
amp = len(sys.argv) <= 3 or sys.argv[3] == "1"
cfg = load_config(None, [
    "Global.mode=graph", "Global.seed=0", "Model.name=iresnet", "Model.layers=[1, 1, 1, 1]", "Model.width=4",
    "Model.embedding_size=16", "Loss.margin=[1.0, 0.0, 0.35]", "Loss.scale=16.0", "Optimizer.lr=0.1",
    f"Optimizer.sparse_fc_update={str(sparse).lower()}", f"Loss.sample_rate={0.5 if sparse else 1.0}",
    "Data.batch_size=4", "LRScheduler.power=1.0", f"AMP.enable={str(amp).lower()}", "AMP.init_scale=1024.0",
])
system = build(cfg, 21, total_steps=100, warmup_steps=0)
backbone, head, step = system.backbone, system.head, system.step


def local_params():
    return [p.to_local().numpy().copy() for p in list(backbone.parameters()) + [head.weight]]


rng = np.random.default_rng(0)
r, per_rank = parallel.rank(), 4
fc0 = fc_table.rows(head.weight).tolist()
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
    if hasattr(step, "fc_graph"):  # AMP + sparse: the FC job's step counter (drives its LR schedule)
        counter = step.fc_graph.state_dict()["System-Train-TrainStep"]
        local = counter.to_local().numpy().reshape(-1)  # (a variable of rank 0 only, like the scale)
        record[-1]["fc_job_step"] = int(local[0]) if local.size else None
    if i == 0:
        record[-1].update(fc=fc_table.rows(head.weight).tolist(), fc0=fc0, k=head.num_sample)
json.dump(record, open(f"{out}.{r}.json", "w"))
