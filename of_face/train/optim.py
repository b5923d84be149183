"""Optimizer and learning-rate schedule: SGD(momentum) or AdamW, warm-up + polynomial decay.

The schedule is built from OneFlow's own schedulers (LinearLR then PolynomialLR inside a
SequentialLR) because nn.Graph compiles those into the step; `lr_at` is the same formula in
plain Python, used for logging and as the reference in tests.
"""
from typing import Any, Dict, List

import oneflow as flow

from of_face.models import no_weight_decay


def _head_group(head) -> Dict[str, Any]:
    """The FC group a head asks for (`param_group()`), or plain parameters (tests pass those)."""
    if hasattr(head, "param_group"):
        return head.param_group()
    params = head.parameters() if isinstance(head, flow.nn.Module) else head
    return {"params": [p for p in params if p.requires_grad]}


def param_groups(opt_cfg, backbone, head) -> List[Dict[str, Any]]:
    """Backbone group(s) (gradient-norm clipped, as arcface_torch) and the FC group.

    With `no_weight_decay_on_bn_bias`, the backbone is two groups (the names the model lists in
    `no_weight_decay()` get none) and OneFlow clips each group's norm separately (a documented
    difference from one global backbone norm).
    """
    named = [(n, p) for n, p in backbone.named_parameters() if p.requires_grad]
    if opt_cfg.no_weight_decay_on_bn_bias:
        skip = no_weight_decay(backbone)
        groups = [{"params": [p for n, p in named if n not in skip]},
                  {"params": [p for n, p in named if n in skip], "weight_decay": 0.0}]
    else:
        groups = [{"params": [p for _, p in named]}]
    groups = [g for g in groups if g["params"]]
    if opt_cfg.clip_grad_norm > 0:
        for g in groups:
            g.update(clip_grad_max_norm=opt_cfg.clip_grad_norm, clip_grad_norm_type=2.0)
    return groups + [_head_group(head)]


def build_optimizer(opt_cfg, backbone, head) -> flow.optim.Optimizer:
    """One optimizer over the backbone and the head (a head module, or its parameters)."""
    groups = param_groups(opt_cfg, backbone, head)
    if opt_cfg.name == "adamw":
        return flow.optim.AdamW(groups, lr=opt_cfg.lr, betas=tuple(opt_cfg.betas),
                                weight_decay=opt_cfg.weight_decay)
    return flow.optim.SGD(groups, lr=opt_cfg.lr, momentum=opt_cfg.momentum, weight_decay=opt_cfg.weight_decay)


def build_scheduler(optimizer, total_steps: int, warmup_steps: int, power: float):
    """LR at optimizer step t: base*t/warmup during warm-up, then base*(1 - t'/T')^power."""
    decay = flow.optim.lr_scheduler.PolynomialLR(
        optimizer, decay_batch=max(1, total_steps - warmup_steps), end_learning_rate=0.0, power=power
    )
    if warmup_steps <= 0:
        return decay
    warmup = flow.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.0, end_factor=1.0, total_iters=warmup_steps)
    return flow.optim.lr_scheduler.SequentialLR(
        optimizer, [warmup, decay], milestones=[warmup_steps], interval_rescaling=True
    )


def lr_at(step: int, base_lr: float, total_steps: int, warmup_steps: int, power: float) -> float:
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    t = min(step - warmup_steps, decay_steps)
    return base_lr * (1.0 - t / decay_steps) ** power
