"""The streamed head's row-gradient matmul in OneFlow 0.9 against numpy, one process, one thread.

    OMP_NUM_THREADS=1 python bench/host_matmul.py [N] [C] [D]

Times g = p^T x for p [N, C] and x [N, D] (defaults: one chunk of 1M classes, 512-d, r 0.1, 2 ranks,
K = 19: 256, 2632, 512) with OneFlow's eager matmul (its bundled OpenBLAS: Prescott kernels on this
CPU) and with numpy's BLAS, and OneFlow's exp on [N, 50000] before and after the numpy matmuls: AVX
code that leaves its upper register state dirty makes OneFlow's later SSE kernels slow
(docs/BENCHMARKS.md, P2f). Prints one JSON line of milliseconds per call.
"""
import json
import sys
import time

import numpy as np
import oneflow as flow


def per_call_ms(f, calls=10) -> float:
    f()
    start = time.perf_counter()
    for _ in range(calls):
        f()
    return (time.perf_counter() - start) / calls * 1e3


def main(argv) -> None:
    n, c, d = (int(a) for a in argv[:3]) if len(argv) >= 3 else (256, 2632, 512)
    rng = np.random.default_rng(0)
    p, x = rng.random((n, c), dtype=np.float32), rng.random((n, d), dtype=np.float32)
    z = flow.tensor(rng.random((n, 50000), dtype=np.float32))
    fp, fx = flow.tensor(p), flow.tensor(x)
    out = {"shape": [n, c, d], "oneflow_exp_before": per_call_ms(lambda: flow.exp(z).numpy(), 5)}
    out["oneflow_matmul"] = per_call_ms(lambda: flow.matmul(fp, fx, transpose_a=True).numpy())
    out["numpy_matmul"] = per_call_ms(lambda: p.T @ x)
    out["oneflow_exp_after"] = per_call_ms(lambda: flow.exp(z).numpy(), 5)
    gap = np.abs(flow.matmul(fp, fx, transpose_a=True).numpy() - p.T @ x).max()
    print(json.dumps({**{k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()},
                      "max_abs_difference": float(gap)}))


if __name__ == "__main__":
    main(sys.argv[1:])
