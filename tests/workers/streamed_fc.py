"""Several short runs of the sampled FC head, streamed in K chunks (Loss.fc_chunks) or not, on 2 ranks.

argv: out.json RUN [RUN ...], each RUN a comma-separated spec of `key=value` (tests/test_streamed_head.py
writes them):
    mode=graph|eager  opt=sgd|adamw  K=<Loss.fc_chunks>
    lr=const     Optimizer.lr 0.1 all through
    lr=warm      warm-up over 1 step then power 2 over 4 steps: 0, 0.1, 0.1 * (2/3)^2 (changes every step)
    bb=id        identity backbone: the "images" are the embeddings [N, DIM]
    bb=lin       Linear(12, DIM) + BatchNorm1d: a backbone with a forward and a backward job
    st=graph     K = 1 as TrainGraph's single step (GraphStep; build picks OneJobStep here)
    save=S       also write the trainer's checkpoint after step S
    resume=K2    then build a fresh system at Loss.fc_chunks=K2, load that checkpoint and run the
                 remaining steps on the same batches
Every run starts from the same FC rows w0 and sees the same batches (12-wide inputs for bb=lin; the
identity's are fixed so that step 2 keeps the padded class). Rank 0 writes, per run, the
loss of every step, the whole FC (padded rows included) before and after every step, the FC's
optimizer slots after every step, the stepper and its graphs' compilation counts.
"""
import json
import sys
from pathlib import Path

import numpy as np

import of_face  # noqa: F401  (loads cuDNN/cuBLAS before OneFlow)
import oneflow as flow
from of_face import parallel
from of_face.config import load_config
from of_face.heads import fc_table
from of_face.train.snapshot import load_checkpoint, save_checkpoint
from of_face.train.steps import GraphStep
from of_face.train.system import build

CLASSES, DIM, BATCH, RATE, STEPS, IN = 61, 8, 8, 0.3, 3, 12  # 31 classes per rank (rank 1's last padded), k = 10
SCHEDULES = {"const": dict(total_steps=STEPS, warmup_steps=0, power=0.0),
             "warm": dict(total_steps=4, warmup_steps=1, power=2.0)}


def config(spec, chunks):
    s = SCHEDULES[spec["lr"]]
    return load_config(None, [
        f"Global.mode={spec['mode']}", "Global.seed=0", f"Model.embedding_size={DIM}",
        "Loss.margin=[1.0, 0.0, 0.35]", "Loss.scale=16.0", f"Loss.sample_rate={RATE}", f"Loss.fc_chunks={chunks}",
        f"Optimizer.name={spec['opt']}", "Optimizer.lr=0.1", "Optimizer.momentum=0.9",
        "Optimizer.weight_decay=0.01", "Optimizer.clip_grad_norm=0.0", "Optimizer.sparse_fc_update=true",
        f"Data.batch_size={BATCH // parallel.world_size()}", f"LRScheduler.power={s['power']}"])


def make(spec, chunks):
    s = SCHEDULES[spec["lr"]]
    stepper = GraphStep if spec.get("st") == "graph" else None
    flow.manual_seed(0)  # (the lin backbone's initialisation: the same in every run)
    backbone = flow.nn.Identity() if spec["bb"] == "id" else \
        flow.nn.Sequential(flow.nn.Linear(IN, DIM), flow.nn.BatchNorm1d(DIM))
    return build(config(spec, chunks), CLASSES, backbone=backbone, total_steps=s["total_steps"],
                 warmup_steps=s["warmup_steps"], stepper=stepper)


def fc_state(system):
    """{slot: [padded classes, DIM] rows} of the FC weight's optimizer state (collective)."""
    slots = system.step.state_dict().slots
    return {slot: fc_table.rows(t).tolist() for (param, slot), t in sorted(slots.items()) if param == "head.weight"}


def graphs(step):
    if hasattr(step, "graphs"):
        return [[type(g).__name__, g.builds] for g in step.graphs]
    return [[type(g).__name__, None] for g in (getattr(step, "graph", None),) if g is not None]


def steps(system, batches, first, record):
    r, per = parallel.rank(), BATCH // parallel.world_size()
    for t in range(first, len(batches)):
        x, y = batches[t]
        loss = system.step(parallel.batch(x[r * per:(r + 1) * per]), parallel.batch(y[r * per:(r + 1) * per]))
        record["loss"].append(float(parallel.to_numpy(loss)))
        record["weights"].append(fc_table.rows(system.head.weight).tolist())
        record["state"].append(fc_state(system))
        if str(t + 1) == record.get("save"):
            folder = Path(OUT).parent / f"ckpt-of-run-{list(sys.argv[2:]).index(record['name'])}"
            folder.mkdir(exist_ok=True)
            record["checkpoint"] = save_checkpoint(str(folder), t + 1, system, {"checkpoint_format": "npz"})
    record["backbone"] = {k: parallel.to_numpy(v).tolist() for k, v in system.backbone.state_dict().items()}
    record["stepper"] = type(system.step).__name__
    record["graphs"] = graphs(system.step)
    return record


def run(name, batches, w0):
    spec = {"bb": "id", "lr": "const", **dict(kv.split("=") for kv in name.split(","))}
    system = make(spec, int(spec["K"]))
    with flow.no_grad():
        system.head.weight.copy_(system.head.table.from_rows(w0))
    plan = getattr(system.step, "plan", None)
    record = {"name": name, "k": system.head.num_sample, "local": system.head.local_classes,
              "seed": system.head.seed, "plan": [plan.chunks, plan.size] if plan else None,
              "save": spec.get("save"), "loss": [], "weights": [w0.tolist()], "state": []}
    steps(system, batches, 0, record)
    if "resume" in spec:
        resumed = make(spec, int(spec["resume"]))
        load_checkpoint(record["checkpoint"], resumed)
        record["resumed"] = steps(resumed, batches, int(spec["save"]),
                                  {"name": name, "loss": [], "weights": [], "state": []})
    return record


OUT = sys.argv[1]
rng = np.random.default_rng(3)
W0 = rng.normal(0, 1, (CLASSES + 1, DIM)).astype(np.float32)
DATA = {bb: [(rng.standard_normal((BATCH, n)).astype(np.float32), rng.integers(0, CLASSES, BATCH))
              for _ in range(STEPS)] for bb, n in (("id", DIM), ("lin", IN))}
DATA["id"][1][1][0] = CLASSES // 2  # position 30 of rank 0: step 2 keeps rank 1's padded class
runs = {}
for name in sys.argv[2:]:
    runs[name] = run(name, DATA["lin" if "bb=lin" in name else "id"], W0)
if parallel.rank() == 0:
    result = {"classes": CLASSES, "w0": W0.tolist(), "runs": runs,
              "data": {bb: [[x.tolist(), y.tolist()] for x, y in d] for bb, d in DATA.items()}}
    json.dump(result, open(OUT, "w"))
