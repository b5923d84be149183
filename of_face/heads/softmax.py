"""Softmax cross-entropy over class-split logits, computed forward-only with its gradient.

The head's loss and its gradient with respect to the logits come out of one forward pass
(`softmax_cross_entropy`); `attach_gradient` then hands autograd that gradient, so backward
runs only the cosine matmul and the normalisations. Why: autograd through the margin and the
softmax keeps several [N, C] tensors alive until backward (the exp, the one-hot mask, the
margin's products) and replays as many [N, C] kernels there; here every [N, C] temporary dies
inside the forward, and the one thing backward keeps is the gradient itself (an operand of the
link product). Figures: docs/BENCHMARKS.md.

Every op is local to the rank's columns except all-reduces of [N] vectors (OneFlow's
`sparse_softmax_cross_entropy` on split(1) logits spends most of a CPU step in its row-max
machinery: docs/BENCHMARKS.md, P2). Log-sum-exp is shifted by the exact row max (`row_max`:
each rank's max over its own columns, then a max over the [world, N] maxima): every exp(z - max)
is in (0, 1] and the largest is 1, so the sum neither overflows (it is at most C) nor underflows,
at any class count and any scale whose logits fp32 can hold.
"""
from typing import Tuple

import oneflow as flow

from of_face.heads.margin import constant_like, label_columns, per_row, row_max, row_sum


def softmax_cross_entropy(logits, onehot, target, label_slope=None, grad_scale: float = 1.0,
                          outer: bool = False) -> Tuple:
    """Mean softmax cross-entropy and its gradient, no autograd.

    logits [N, C] (split along C or not), onehot [N, C] (1.0 at each row's label column, on the
    rank that owns it), target [N] each row's label logit (on every rank). Returns (loss, grad)
    with grad = grad_scale * d loss / d logits = grad_scale * (softmax - onehot) / N, except in
    the label column, which is multiplied by label_slope [N] when given: the chain rule through a
    margin that changes only that column (the head passes s and the margin's slope, and gets
    the gradient with respect to the cosines). `outer`: see `margin.per_row`.
    """
    n = logits.shape[0]
    shift = row_max(logits)
    e = flow.exp(logits - per_row(shift, logits, outer))
    total = row_sum(e)
    loss = (flow.log(total) + shift - target).mean()
    p_target = flow.exp(target - shift) / total
    # label column: (p - 1) * slope; elsewhere p. As p + onehot * c: c = (p - 1) * slope - p.
    c = (p_target - 1.0) * label_slope - p_target if label_slope is not None else constant_like(p_target, -1.0)
    k = grad_scale / n
    grad = e * per_row(k / total, e, outer) + onehot * per_row(k * c, e, outer)
    return loss, grad


def attach_gradient(value, x, grad):
    """`value`, with d value / d x = grad for autograd: x [..] carries the graph, grad is a
    constant. The link (x * grad).sum() minus its own detached copy is exactly 0 in the forward
    (the same float ops on the same values), so the value is unchanged bit for bit."""
    link = (x * grad).sum()
    return value + (link - link.detach())


def class_split_cross_entropy(logits, labels):
    """Mean softmax cross-entropy of logits [N, C] split along C, labels [N] broadcast;
    differentiable (the gradient comes from `softmax_cross_entropy`, as in the head)."""
    z = logits.detach()
    onehot = label_columns(z, labels)
    loss, grad = softmax_cross_entropy(z, onehot, row_sum(z * onehot), outer=True)  # (as the head without AMP)
    return attach_gradient(loss, logits, grad)
