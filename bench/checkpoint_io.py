"""Checkpoint save/load of a large FC: time and peak RSS per rank, one-file vs sharded format.

    python -m oneflow.distributed.launch --nproc_per_node 2 bench/checkpoint_io.py \
        --classes 1000000 --dim 128 --format sharded [--no-momentum] [--out DIR]

Each rank holds its class slice of an FC weight [classes, dim] (float32, split over the ranks,
random) and, unless --no-momentum, SGD momentum of the same shape, plus a tiny backbone, in the
TrainingSystem shape that of_face.train.snapshot reads. It then saves one checkpoint
(save_checkpoint) and loads it back into the same tensors (load_checkpoint), and prints per rank:
the resident set before (the state itself), the peak RSS during the save and during the load
(sampled every 2 ms from /proc/self/statm), and the wall time of each. "one shard" below is this
rank's weight slice, classes / world x dim x 4 bytes.
"""
import argparse
import json
import os
import shutil
import threading
import time
from types import SimpleNamespace

import numpy as np

import of_face  # noqa: F401  (preloads libraries; must precede oneflow)
import oneflow as flow

from of_face import parallel
from of_face.config import ModelCfg
from of_face.models import build_backbone
from of_face.oneflow_compat import sync
from of_face.train.steps import TRAIN_STEP_VAR, StepperState
from of_face.heads.fc_table import FCTable
from of_face.train.snapshot import load_checkpoint, save_checkpoint

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class Peak:
    """Highest RSS seen while the block runs (a sampling thread)."""

    def __enter__(self):
        self.peak, self.stop = rss(), False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.t0 = time.time()
        return self

    def _run(self):
        while not self.stop:
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.seconds = time.time() - self.t0
        self.stop = True
        self.thread.join()
        self.peak = max(self.peak, rss())


class Head(flow.nn.Module):
    def __init__(self, classes, dim):
        super().__init__()
        self.num_classes = classes
        self.embedding_size = dim
        self.weight = flow.nn.Parameter(FCTable.of(classes).random(dim, 0.01, "cpu"))


class SGD:  # the optimizer's class name says which slots a checkpoint restores
    pass


class Stepper:
    def __init__(self, slots):
        self.slots = slots

    def state_dict(self):
        return StepperState(slots=dict(self.slots), variables={TRAIN_STEP_VAR: np.array([7], np.int64)}, step=7,
                            scheduler={})

    def load_state_dict(self, state):
        for key, t in state.slots.items():
            self.slots[key].copy_(t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--classes", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--format", choices=("npz", "sharded"), default="sharded")
    ap.add_argument("--no-momentum", action="store_true")
    ap.add_argument("--out", default="/tmp/of_face_ckpt_bench")
    args = ap.parse_args()
    rank, world = parallel.rank(), parallel.world_size()
    backbone = parallel.broadcast_module(build_backbone(ModelCfg(name="iresnet", layers=[1, 1, 1, 1], width=8,
                                                                 embedding_size=args.dim)), "cpu")
    head = Head(args.classes, args.dim)
    slots = {} if args.no_momentum else {
        ("head.weight", "momentum_buf"): FCTable.of(args.classes).random(args.dim, 0.01, "cpu")}
    system = SimpleNamespace(backbone=backbone, head=head, optimizer=SGD(), step=Stepper(slots))
    sync()
    if rank == 0:
        shutil.rmtree(args.out, ignore_errors=True)
        os.makedirs(args.out)
    parallel.barrier()
    shard = head.weight.to_local().numpy().nbytes
    before = rss()
    meta = {"epoch": 0, "batch_in_epoch": 0, "config": {}, "run_id": "bench", "checkpoint_format": args.format}
    with Peak() as save:
        path = save_checkpoint(args.out, 7, system, meta)
    parallel.barrier()
    with Peak() as load:
        load_checkpoint(path, system)
        sync()
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) \
        if os.path.isdir(path) else os.path.getsize(path)
    row = {"rank": rank, "world": world, "format": args.format, "classes": args.classes, "dim": args.dim,
           "momentum": not args.no_momentum, "shard_MB": shard / 1e6, "rss_before_MB": before / 1e6,
           "save_s": round(save.seconds, 2), "save_peak_MB": save.peak / 1e6,
           "save_extra_MB": (save.peak - before) / 1e6, "load_s": round(load.seconds, 2),
           "load_peak_MB": load.peak / 1e6, "load_extra_MB": (load.peak - before) / 1e6,
           "checkpoint_MB": size / 1e6}
    time.sleep(0.2 * rank)  # ranks print one after the other
    print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    parallel.barrier()
    if rank == 0:
        shutil.rmtree(args.out, ignore_errors=True)


if __name__ == "__main__":
    main()
