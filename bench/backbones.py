"""P3: training-step speed, peak memory and FLOPs of every published backbone on CPU.

    python bench/backbones.py [--batch 8] [--modes graph,eager] [--models iresnet18,...] [--out results.json]

One single-process training step = backbone forward + a 1000-class PartialFC/ArcFace head +
backward + SGD update (`of_face.train.steps`: TrainGraph for `graph`, EagerStep for `eager`;
`graph_ckpt` = TrainGraph with activation checkpointing). The head is ~0.5 MFLOP/sample, so the
figure is the backbone's forward+backward. Every (model, mode) runs in a fresh subprocess so its
memory figure is its own: peak memory = the process's max RSS (`resource.getrusage`) after the
timed steps minus its max RSS once model, head, optimizer and batch exist (activations,
gradients, optimizer state, graph compilation; not the parameters themselves).

Steps: 1 warm-up step (graph compilation happens here), then timed steps until 3 steps or 20 s,
whichever comes first (at least 1). A model is skipped when its warm-up step alone takes over
60 s, or when a cheaper model of its family predicts more than 60 s per step.

FLOPs per sample: 2 x multiply-accumulates of the forward pass, counted with forward hooks on
a batch-1 eager forward: Conv2d (out elements x in/groups x kh x kw), Linear (out elements x in
features) and the two attention matmuls of FaceViT (2 x L^2 x D per block); BN, activations and
additions are left out. Training costs about 3x this (forward + two backward matmuls).

Also prints the machine's fp32 matmul rate (1024x1024 `flow.matmul`) so the samples/s can be
read against what the CPU can do.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

# this checkout's of_face, not whichever copy the venv has installed
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import of_face  # noqa: F401,E402
import oneflow as flow  # noqa: E402
import oneflow.nn as nn  # noqa: E402

MODELS = ["iresnet18", "iresnet50", "iresnet100", "iresnet200", "mbf", "mbf_large",
          "vit_t", "vit_s", "vit_b", "vit_l"]
CLASSES, EMB = 1000, 512
STEP_LIMIT_S, TIMED_S, TIMED_STEPS = 60.0, 20.0, 3


def maxrss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def forward_flops(name):
    """2 x forward MACs per sample (conv, linear, attention matmuls), batch-1 eager forward."""
    from of_face.models import MODELS as BUILD
    from of_face.models.face_vit import Attention

    model = BUILD[name]()
    model.eval()
    macs = [0]

    def hook(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            macs[0] += output.numel() * (module.in_channels // module.groups) * kh * kw
        elif isinstance(module, nn.Linear):
            macs[0] += output.numel() * module.in_features
        elif isinstance(module, Attention):
            n, length, dim = inputs[0].shape
            macs[0] += 2 * n * length * length * dim  # q @ k^T and attn @ v over all heads

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, Attention)):
            m.register_forward_hook(hook)
    with flow.no_grad():
        model(flow.zeros(1, 3, 112, 112))
    return 2 * macs[0]


def matmul_gflops(n=1024, seconds=3.0):
    a, b = flow.randn(n, n), flow.randn(n, n)
    for _ in range(3):
        flow.matmul(a, b).numpy()
    reps, start = 0, time.time()
    while time.time() - start < seconds:  # eager ops are queued asynchronously: sync each one
        flow.matmul(a, b).numpy()
        reps += 1
    return 2 * n**3 * reps / (time.time() - start) / 1e9


def run_one(name, mode, batch):
    """One (model, mode) measurement in this process; returns a dict."""
    from of_face import parallel
    from of_face.config import load_config
    from of_face.train.system import build

    ckpt = mode == "graph_ckpt"  # TrainGraph with activation checkpointing
    cfg = load_config(None, [
        f"Model.name={name}", f"Model.embedding_size={EMB}", f"Model.activation_checkpointing={str(ckpt).lower()}",
        f"Global.mode={'graph' if ckpt else mode}", "Global.device=cpu", "Global.seed=0",
        "Loss.margin=[1.0, 0.5, 0.0]", "Loss.scale=64.0", "Optimizer.lr=0.01", "Optimizer.clip_grad_norm=0.0",
        "Optimizer.sparse_fc_update=false", f"Data.batch_size={batch}", "LRScheduler.power=0",  # constant LR
    ])
    system = build(cfg, CLASSES, total_steps=1 + TIMED_STEPS, warmup_steps=0)
    backbone, step = system.backbone, system.step
    rng = np.random.default_rng(0)
    x = parallel.batch(rng.standard_normal((batch, 3, 112, 112)).astype(np.float32), device="cpu")
    y = parallel.batch(rng.integers(0, CLASSES, batch), device="cpu")
    base = maxrss_mib()

    start = time.time()
    parallel.to_numpy(step(x, y))
    warmup = time.time() - start
    result = {"model": name, "mode": mode, "batch": batch, "warmup_s": round(warmup, 2),
              "params_m": round(sum(p.numel() for p in backbone.parameters()) / 1e6, 3)}
    if warmup > STEP_LIMIT_S:
        result["skipped"] = f"warm-up step took {warmup:.0f} s > {STEP_LIMIT_S:.0f} s"
        return result
    times, start = [], time.time()
    while len(times) < TIMED_STEPS and (not times or time.time() - start < TIMED_S):
        t = time.time()
        parallel.to_numpy(step(x, y))
        times.append(time.time() - t)
    result.update(step_s=round(float(np.mean(times)), 3), timed_steps=len(times),
                  samples_per_s=round(batch / float(np.mean(times)), 3),
                  peak_rss_delta_mib=round(maxrss_mib() - base, 1), base_rss_mib=round(base, 1))
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--modes", default="graph,eager")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--out", default="")
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    ap.add_argument("--flops", metavar="MODEL", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one[0], args.one[1], args.batch)), flush=True)
        return
    if args.flops:
        print("RESULT " + json.dumps({"flops": forward_flops(args.flops)}), flush=True)
        return

    def child(extra, timeout):
        cmd = [sys.executable, os.path.abspath(__file__), "--batch", str(args.batch)] + extra
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"skipped": f"no result within {timeout} s"}
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if not lines:
            return {"error": (proc.stderr or proc.stdout)[-800:]}
        return json.loads(lines[-1][len("RESULT "):])

    rate = matmul_gflops()
    print(f"matmul 1024x1024 fp32: {rate:.1f} GFLOP/s", flush=True)
    report = {"matmul_gflops": round(rate, 1), "batch": args.batch, "rows": []}
    sec_per_flop = {}  # (family, mode) -> seconds per forward FLOP, from the last model measured
    for name in args.models.split(","):
        flops = child(["--flops", name], 300).get("flops")
        family = name.rstrip("0123456789").split("_")[0]
        for mode in args.modes.split(","):
            predicted = sec_per_flop.get((family, mode), 0) * (flops or 0) * args.batch
            if predicted > STEP_LIMIT_S:
                row = {"model": name, "mode": mode,
                       "skipped": f"predicted {predicted:.0f} s/step > {STEP_LIMIT_S:.0f} s "
                                  f"(from the smaller {family})"}
            else:
                row = child(["--one", name, mode], 600)
                row.setdefault("model", name)
                row.setdefault("mode", mode)
            row["gflops_per_sample"] = round(flops / 1e9, 3) if flops else None
            if row.get("step_s") and flops:
                sec_per_flop[(family, mode)] = row["step_s"] / (flops * args.batch)
                row["achieved_gflop_s"] = round(3 * flops * row["samples_per_s"] / 1e9, 1)  # fwd + bwd ~ 3x fwd
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
