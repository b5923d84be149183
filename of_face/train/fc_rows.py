"""The FC's sparse update at K > 1 chunks (train/streamed_step.py): each rank's own rows, on the host.

Each chunk gives g, d loss / d wn of the chunk's normalised rows (heads/streamed.py, 4: `rows_grad`
on the host from the chunk's p). `RowOptimizer.apply` then reads the chunk's rows and their optimizer state
from the rank's own shard (numpy views of the local tensors: the same memory, no copy), takes g
through the normalisation (`streamed.rows_gradient`) and writes back the rows and their state: only
the chunk's rows and their optimizer state change, as with OneFlow's indexed-slices update at
K = 1, whose formulas these are (model_update_kernel_util.h, MomentumUpdateFunctor and
AdamUpdateFunctor):

    SGD    m = beta m + g (+ wd w, an L2 decay; sparse SGD's decay comes in g, heads.sparse_fc_options)
           w = w - lr m                 (no momentum: w - lr g)
    AdamW  m = b1 m + (1 - b1) g,  v = b2 v + (1 - b2) g^2   (b1, b2 as float32, as the kernel)
           w = w - lr wd w - lr m / (c1 (sqrt(v / c2) + eps)),  c1 = 1 - b1^t, c2 = 1 - b2^t,
           PLSC's bias correction with t the FC updates made (train/optim.py), applied directly.

Why not OneFlow's kernel in a compiled job: on CPU `indexed_slices_momentum_update` first
reduces duplicate indices (there are none within a chunk) and then updates element by element
with an integer division each; at 1M classes, 512-d it took 0.48 s of a 1.9 s step, and the job's
step counter had to be reset before each chunk (two syncs). numpy's gathers, scatters and
arithmetic on the rank's rows cost a fraction of that (docs/BENCHMARKS.md, P2e).

The slots are global tensors placed like the weight, named as eager OneFlow names them
(`momentum_buf`, `exp_avg`, `exp_avg_sq`): a checkpoint written at K = 1 (the graph's slots) or
in eager mode resumes here and the other way round (train/steps.py, StepperState).
"""
from typing import Any, Dict, Tuple

import numpy as np
import oneflow as flow

from of_face.heads.streamed import rows_gradient
from of_face.oneflow_compat import LRScheduler
from of_face.train.optim import scheduled_lr

WEIGHT = "head.weight"


class RowOptimizer:
    """The FC group's optimizer (SGD with momentum, or AdamW) applied to given rows of each rank's
    shard, with its own slots. Duck-types the slot interface of steps.FCJob (`slots`, `load_slots`)."""

    def __init__(self, head: Any, optimizer: flow.optim.Optimizer, scheduler: LRScheduler):
        self.head, self.scheduler = head, scheduler
        self.group = next(g for g in optimizer.param_groups if any(p is head.weight for p in g.parameters))
        self.adamw = isinstance(optimizer, flow.optim.AdamW)
        names = ("exp_avg", "exp_avg_sq") if self.adamw else (("momentum_buf",) if self.group["momentum"] else ())
        with flow.no_grad():
            self._slots = {name: flow.zeros_like(head.weight) for name in names}
        self._views: Dict[str, np.ndarray] = {}

    def _view(self, name: str, t: flow.Tensor) -> np.ndarray:
        """This rank's shard of `t` as a [local, D] numpy view (it shares the tensor's memory)."""
        if name not in self._views:
            self._views[name] = self._shard(t)
        return self._views[name]

    def _shard(self, t: flow.Tensor) -> np.ndarray:
        return t.to_local().numpy().reshape(self.head.local_classes, -1)

    def apply(self, idx: np.ndarray, g: np.ndarray, step: int, updates: int) -> None:
        """Update local rows `idx` (distinct) from g [len(idx), D] = d loss / d wn, with the LR
        of optimizer step `step` (0-based) and, for AdamW's correction, t = `updates` (this
        update included). The caller has waited for every job that writes these rows."""
        lr = np.float32(scheduled_lr(self.scheduler, self.group["initial_lr"], step))
        weight = self._view("weight", self.head.weight)
        w = weight[idx]
        grad = rows_gradient(w, g, self.head.row_decay)
        wd = np.float32(self.group["weight_decay"])
        if self.adamw:
            self._adamw(idx, w, grad, lr, wd, updates)
        else:
            if wd:
                grad += wd * w
            if self._slots:
                buf = self._view("momentum_buf", self._slots["momentum_buf"])
                m = buf[idx] * np.float32(self.group["momentum"]) + grad
                buf[idx] = m
                grad = m
            w -= lr * grad
        weight[idx] = w

    def _adamw(self, idx: np.ndarray, w: np.ndarray, grad: np.ndarray, lr: np.float32, wd: np.float32,
               t: int) -> None:
        """AdamW's step on rows w (updated in place), PLSC's bias correction with t updates."""
        b1, b2 = self.group["betas"]
        f1, f2 = np.float32(b1), np.float32(b2)
        exp_avg, exp_avg_sq = (self._view(n, self._slots[n]) for n in ("exp_avg", "exp_avg_sq"))
        m = exp_avg[idx] * f1 + (np.float32(1.0) - f1) * grad
        v = exp_avg_sq[idx] * f2 + (np.float32(1.0) - f2) * grad * grad
        exp_avg[idx], exp_avg_sq[idx] = m, v
        c1, c2 = 1.0 - b1 ** t, 1.0 - b2 ** t
        denom = np.float32(c1) * (np.sqrt(v) / np.float32(np.sqrt(c2)) + np.float32(self.group["eps"]))
        w -= lr * wd * w + lr * m / denom

    def slots(self) -> Dict[Tuple[str, str], flow.Tensor]:
        """The FC weight's optimizer slots by eager name (steps.StepperState)."""
        return {(WEIGHT, name): t for name, t in self._slots.items()}

    def load_slots(self, slots: Dict[Tuple[str, str], Any]) -> None:
        """Copy a checkpoint's slots (tensors placed like the weight) into this optimizer's."""
        for (_, name), t in slots.items():
            if name in self._slots:
                self._view(name, self._slots[name])[...] = self._shard(t)
