"""One training-mode BatchNorm2d on CPU against float64: OneFlow's kernel, bench/accurate_bn.py, bench/shifted_bn.py.

    python bench/bn_accuracy.py [--shape 32 128 56 56] [--case MEAN STD ...]

For each case the input x and the incoming gradient dy are both N(MEAN, STD^2) per element (float32),
weight ~ 1 + 0.1 N(0,1), bias ~ 0.1 N(0,1). Prints the relative L2 error against float64 numpy of the
output, dx, d weight, d bias, and the running statistics after one update (momentum 0.1).
"""
import argparse
import sys
from pathlib import Path

import numpy as np

import of_face  # noqa: F401  (preloads libraries; must precede oneflow)
import oneflow as flow

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accurate_bn  # noqa: E402
import shifted_bn  # noqa: E402


def ref(x, w, b, g, eps=1e-5):
    ax, sh = (0, 2, 3), (1, -1, 1, 1)
    m = x.mean(ax, keepdims=True)
    xc = x - m
    v = (xc * xc).mean(ax, keepdims=True)
    inv = 1 / np.sqrt(v + eps)
    xh = xc * inv
    y = xh * w.reshape(sh) + b.reshape(sh)
    gh = g * w.reshape(sh)
    dx = inv * (gh - gh.mean(ax, keepdims=True) - xh * (gh * xh).mean(ax, keepdims=True))
    n = x.size // x.shape[1]
    return y, dx, (g * xh).sum(ax), g.sum(ax), m.ravel(), v.ravel() * n / (n - 1)


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=int, nargs=4, default=[32, 128, 56, 56])
    ap.add_argument("--case", type=float, nargs=2, action="append", metavar=("MEAN", "STD"))
    args = ap.parse_args()
    cases = args.case or [(3.0, 0.05), (0.0, 1.0)]
    rng = np.random.default_rng(0)
    c = args.shape[1]
    w = (1 + 0.1 * rng.standard_normal(c)).astype(np.float32)
    b = (0.1 * rng.standard_normal(c)).astype(np.float32)
    for mu, sd in cases:
        x32 = (mu + sd * rng.standard_normal(args.shape)).astype(np.float32)
        g32 = (mu + sd * rng.standard_normal(args.shape)).astype(np.float32)
        y64, dx64, dw64, db64, m64, v64 = ref(x32.astype(np.float64), w.astype(np.float64), b.astype(np.float64),
                                               g32.astype(np.float64))
        for label, cls in (("kernel", flow.nn.BatchNorm2d), ("accurate_bn", accurate_bn.BatchNorm2d),
                           ("shifted_bn", shifted_bn.BatchNorm2d)):
            bn = cls(c)
            bn.train()
            with flow.no_grad():
                bn.weight.copy_(flow.tensor(w))
                bn.bias.copy_(flow.tensor(b))
            x = flow.tensor(x32, requires_grad=True)
            y = bn(x)
            y.backward(flow.tensor(g32))
            print(f"mean {mu:g} std {sd:g} {label:12s} out {rel(y.numpy(), y64):.2e}  "
                  f"dx {rel(x.grad.numpy(), dx64):.2e}  "
                  f"dw {rel(bn.weight.grad.numpy(), dw64):.2e}  db {rel(bn.bias.grad.numpy(), db64):.2e}  "
                  f"running_mean {rel(bn.running_mean.numpy(), 0.1 * m64):.2e}  "
                  f"running_var {rel(bn.running_var.numpy(), 0.9 + 0.1 * v64):.2e}", flush=True)
            del x, y


if __name__ == "__main__":
    main()
