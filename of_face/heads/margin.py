"""Combined angular margin: logit_y = s * (cos(m1 * theta_y + m2) - m3), others s * cos(theta).

ArcFace = (1, 0.5, 0), CosFace = (1, 0, 0.4), SphereFace-like m1 > 1. Only one column per row
changes, so the margin is computed on the [N] target cosines: the label column is marked with
OneFlow's `combined_margin_loss` op on zeros (on class-split (S(1)) logits each rank marks only
the columns it owns), a row sum all-reduces the target cosine, and the [N, C] work is two
multiply-adds, cheaper than the elementwise margin op with its where-guard over [N, C] (figures:
docs/BENCHMARKS.md, P2).

Guard (the `easy_margin=False` branch of insightface's MXNet ArcFace), for m1 = 1: once
theta + m2 passes pi, cos(theta + m2) turns back up and would reward a target that moved *away*;
there the target logit is cos(theta) - m2 * sin(m2) - m3 instead (the first-order expansion of the
margin, still falling with theta). PLSC (Paddle's margin_cross_entropy) and OneFlow's
combined_margin_loss apply no guard; arcface_torch's CombinedMarginLoss (insightface 7fadd420)
computes the guard's values but never uses them. With m1 != 1 (SphereFace-style) that
continuation would jump upward, so, like insightface's original combined margin, no guard is
applied. Both branches are differentiated exactly (away from the guard: the gradient of PLSC's
and OneFlow's ops, m1 * sin(m1*theta + m2) / sin(theta)).
"""
import math

import oneflow as flow
import oneflow.nn as nn

from of_face import parallel
from of_face.oneflow_compat import functional

# d cos(m1*theta + m2) / d cos(theta) = m1 * sin(m1*theta + m2) / sin(theta) is infinite at
# cos = +-1 (inf, and a memorised sample reaches cos = 1.0 in FP32): the margin sees cosines at
# most 1e-6 away from +-1, where the factor stays below ~400.
COS_LIMIT = 1.0 - 1e-6
ARCFACE = (1.0, 0.5, 0.0)
COSFACE = (1.0, 0.0, 0.4)


class CombinedMargin(nn.Module):
    def __init__(self, m1=1.0, m2=0.5, m3=0.0, scale=64.0):
        super().__init__()
        self.m1, self.m2, self.m3, self.scale = float(m1), float(m2), float(m3), float(scale)
        # cos(theta) below cos(pi - m2) means theta + m2 > pi
        self.guard_cos = math.cos(math.pi - self.m2) if self.m1 == 1.0 and 0.0 < self.m2 < math.pi else None

    def forward(self, cosine, labels):
        """cosine [N, C] (may be split along C), labels [N] broadcast -> scaled logits."""
        if self.identity:
            return cosine * self.scale
        onehot = label_columns(cosine, labels)
        t = row_sum(cosine * onehot)  # [N] each row's target cosine, on every rank
        target = self.target_logit(t)
        # Only the label column changes: cos + (target - cos) there. Its derivative w.r.t. that
        # cosine is target'(t), exactly; every other column passes through with derivative 1.
        return (cosine + onehot * per_row(target - t, cosine)) * self.scale

    def target_logit(self, t):
        """[N] target cosines -> cos(m1 * theta + m2) - m3, guarded past pi (before the scale)."""
        return self.target_and_slope(t)[0]

    def target_and_slope(self, t):
        """[N] target cosines -> (target logit before the scale, its derivative d/dt), no autograd.

        The derivative is the one autograd gives `target_logit` (tests/test_margin_guard.py
        checks it against autograd): m1 * sin(m1*theta + m2) / sin(theta) inside the clamp to
        +-COS_LIMIT, 0 outside it, 1 on the guard's linear branch.
        """
        limit = constant_like(t, COS_LIMIT)
        theta = flow.acos(flow.minimum(flow.maximum(t, -limit), limit))
        angle = self.m1 * theta + self.m2
        out = flow.cos(angle) - self.m3
        inside = flow.logical_and(t >= -limit, t <= limit)
        slope = flow.where(inside, self.m1 * flow.sin(angle) / flow.sin(theta), constant_like(t, 0.0))
        if self.guard_cos is not None:
            past_pi = t < constant_like(t, self.guard_cos)
            out = flow.where(past_pi, t - (self.m2 * math.sin(self.m2) + self.m3), out)
            slope = flow.where(past_pi, constant_like(t, 1.0), slope)
        return out, slope

    @property
    def identity(self) -> bool:
        """No margin at all (plain normalised softmax): logits are s * cos."""
        return (self.m1, self.m2, self.m3) == (1.0, 0.0, 0.0)

    @property
    def max_logit(self):
        """No logit exceeds this: s * cos for other classes, s * (cos(...) - m3) for the target."""
        return self.scale * max(1.0, 1.0 - self.m3)

    def extra_repr(self):
        return f"m1={self.m1}, m2={self.m2}, m3={self.m3}, s={self.scale}"


def label_columns(x, labels):
    """1.0 at [i, labels[i]] and 0.0 elsewhere, shaped like x [N, C]; on class-split x each rank
    marks only the label columns it owns (OneFlow's margin op with cos(theta) - (-1) on zeros)."""
    return functional.combined_margin_loss(constant_like(x, 0.0), labels, m1=1.0, m2=0.0, m3=-1.0)


def constant_like(x, value, dtype=None):
    """A tensor shaped and placed like x (its dtype unless given), filled with value. flow.zeros_like
    / ones_like / full_like build a module on each call, which nn.Graph reports with a UserWarning
    in every run's log."""
    dtype = dtype or x.dtype
    if x.is_global:
        return functional.global_constant(x.shape, value, dtype=dtype, placement=x.placement, sbp=x.sbp)
    return functional.constant(x.shape, value, dtype=dtype, device=x.device)


def row_sum(x):
    """x [N, C] -> [N], summed over all columns: an all-reduce when x is split along C."""
    total = x.sum(dim=1)
    return parallel.gather(total) if total.is_global else total


def row_max(x):
    """x [N, C] -> [N], the max over all columns, on every rank.

    On class-split x each rank takes the max of its own columns (x viewed as [N, world, C/world],
    split along the middle axis: a local view, no data moves) and only the [N, world] maxima are
    all-gathered. OneFlow's own reduce over the split axis re-boxes x instead.
    """
    if not x.is_global or x.sbp != parallel.SBP_LOGITS:
        return x.max(dim=1)[0]
    world = parallel.world_size()
    local = x.view(x.shape[0], world, x.shape[1] // world).max(dim=2)[0]  # [N, world] split(1)
    return parallel.gather(local).max(dim=1)[0]


def per_row(v, like, outer: bool = False):
    """v [N] repeated along the columns of like [N, C] (same SBP as like).

    Spelled with broadcast_like because OneFlow 0.9's CPU kernels broadcast an [N, 1] operand
    against [N, C] element by element, an order of magnitude slower than broadcast_like plus a
    same-shape op (docs/BENCHMARKS.md, P2). `outer`: as the outer product of v and a ones row
    instead (a K = 1 matmul, exact), faster again on the CPU; not under AMP, where nn.Graph
    runs every matmul in FP16.
    """
    if outer:
        ones = constant_like(like[:1], 1.0) if not like.is_global else functional.global_constant(
            (1, like.shape[1]), 1.0, dtype=like.dtype, placement=like.placement, sbp=like.sbp)
        return flow.matmul(v.unsqueeze(1).to(like.dtype), ones)
    return flow.broadcast_like(v.unsqueeze(1), like, broadcast_axes=[1])
