"""Optimizer and learning-rate schedule: SGD(momentum, wd), linear warm-up + polynomial decay.

The schedule is built from OneFlow's own schedulers (LinearLR then PolynomialLR inside a
SequentialLR) because nn.Graph compiles those into the step; `lr_at` is the same formula in
plain Python, used for logging and as the reference in tests.
"""
import oneflow as flow


def build_optimizer(opt_cfg, backbone_params, head_params):
    """SGD over two groups: the backbone (gradient-norm clipped, as arcface_torch) and the FC."""
    backbone = {"params": [p for p in backbone_params if p.requires_grad]}
    if opt_cfg.clip_grad_norm > 0:
        backbone.update(clip_grad_max_norm=opt_cfg.clip_grad_norm, clip_grad_norm_type=2.0)
    head = {"params": [p for p in head_params if p.requires_grad]}
    return flow.optim.SGD(
        [backbone, head], lr=opt_cfg.lr, momentum=opt_cfg.momentum, weight_decay=opt_cfg.weight_decay
    )


def build_scheduler(optimizer, total_steps, warmup_steps, power):
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


def lr_at(step, base_lr, total_steps, warmup_steps, power):
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    t = min(step - warmup_steps, decay_steps)
    return base_lr * (1.0 - t / decay_steps) ** power
