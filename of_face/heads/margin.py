"""Combined angular margin: logit_y = s * (cos(m1 * theta_y + m2) - m3), others s * cos(theta).

ArcFace = (1, 0.5, 0), CosFace = (1, 0, 0.4), SphereFace-like m1 > 1. The target-class term
goes through OneFlow's fused `combined_margin_loss` op, which also works on class-split (S(1))
logits with broadcast labels: each rank adjusts only the columns it owns.
"""
import oneflow as flow
import oneflow.nn as nn

ARCFACE = (1.0, 0.5, 0.0)
COSFACE = (1.0, 0.0, 0.4)


class CombinedMargin(nn.Module):
    def __init__(self, m1=1.0, m2=0.5, m3=0.0, scale=64.0):
        super().__init__()
        self.m1, self.m2, self.m3, self.scale = float(m1), float(m2), float(m3), float(scale)

    def forward(self, cosine, labels):
        """cosine [N, C] (may be split along C), labels [N] broadcast -> scaled logits."""
        if (self.m1, self.m2, self.m3) != (1.0, 0.0, 0.0):
            cosine = flow._C.combined_margin_loss(cosine, labels, m1=self.m1, m2=self.m2, m3=self.m3)
        return cosine * self.scale

    def extra_repr(self):
        return f"m1={self.m1}, m2={self.m2}, m3={self.m3}, s={self.scale}"
