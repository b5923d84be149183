"""Combined angular margin: logit_y = s * (cos(m1 * theta_y + m2) - m3), others s * cos(theta).

ArcFace = (1, 0.5, 0), CosFace = (1, 0, 0.4), SphereFace-like m1 > 1. The target-class term
goes through OneFlow's fused `combined_margin_loss` op, which also works on class-split (S(1))
logits with broadcast labels: each rank adjusts only the columns it owns.

Guard (insightface / arcface_torch convention, `easy_margin=False`), for m1 = 1: once theta + m2
passes pi, cos(theta + m2) turns back up and would reward a target that moved *away*; there the
target logit is cos(theta) - m2 * sin(m2) - m3 instead (the first-order expansion of the margin,
still falling with theta). With m1 != 1 (SphereFace-style) that continuation would jump upward,
so, like insightface's original combined margin, no guard is applied. OneFlow's op has no such guard, so it is applied here with a `where`
on the target column, found with the same op (it marks the label column of each row on
whichever rank owns it). Both branches are differentiated exactly.
"""
import math

import oneflow as flow
import oneflow.nn as nn

# d cos(m1*theta + m2) / d cos(theta) = m1 * sin(m1*theta + m2) / sin(theta) is infinite at
# cos = +-1 (OneFlow's op returns inf there, and a memorised sample reaches cos = 1.0 in FP32):
# the op sees cosines at most 1e-6 away from +-1, where the factor stays below ~400.
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
        if (self.m1, self.m2, self.m3) != (1.0, 0.0, 0.0):
            safe = cosine.clamp(-COS_LIMIT, COS_LIMIT)
            margin = flow._C.combined_margin_loss(safe, labels, m1=self.m1, m2=self.m2, m3=self.m3)
            if self.guard_cos is not None:
                # 1.0 in each row's label column (on the rank that owns it), 0.0 elsewhere
                target = flow._C.combined_margin_loss(flow.zeros_like(cosine), labels, m1=1.0, m2=0.0, m3=-1.0)
                # No comparison with a Python scalar here: on OneFlow 0.9's CPU those run ~200x slower
                # than tensor-tensor ones (0.8 s each at 128 x 50k, 90% of the whole FC step).
                past_pi = target.to(flow.bool) & (cosine < flow.full_like(cosine, self.guard_cos))
                margin = flow.where(past_pi, cosine - (self.m2 * math.sin(self.m2) + self.m3), margin)
            cosine = margin
        return cosine * self.scale

    @property
    def max_logit(self):
        """No logit exceeds this: s * cos for other classes, s * (cos(...) - m3) for the target."""
        return self.scale * max(1.0, 1.0 - self.m3)

    def extra_repr(self):
        return f"m1={self.m1}, m2={self.m2}, m3={self.m3}, s={self.scale}"
