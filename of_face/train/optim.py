"""Optimizer and learning-rate schedule: SGD(momentum) or AdamW, warm-up + polynomial decay.

The schedule is built from OneFlow's own schedulers (LinearLR then PolynomialLR inside a
SequentialLR) because nn.Graph compiles those into the step; `lr_at` is the same formula in
plain Python, used for logging and as the reference in tests.
"""
import oneflow as flow

from of_face.heads.partial_fc import PartialFC


NO_DECAY_NAMES = ("pos_embed", "mask_token")


def _no_decay(name, param):
    """BN/PReLU scales, biases (all 1-D) and ViT position/mask embeddings."""
    return param.dim() <= 1 or any(n in name for n in NO_DECAY_NAMES)


def sparse_fc_options(opt_cfg):
    """(FC group options, decay the head applies to kept rows) for sparse FC updates.

    OneFlow's indexed-slices pass only rewrites an update without weight decay, so sparse SGD
    moves the decay into the head (a penalty on the kept rows, same gradient wd*w). Its sparse
    Adam kernel applies the decoupled decay to kept rows but no bias correction; the FC group
    turns bias correction off so that eager mode follows the same rule.
    """
    if opt_cfg.name == "sgd":
        return {"weight_decay": 0.0}, opt_cfg.weight_decay
    return {"do_bias_correction": False}, 0.0


def param_groups(opt_cfg, backbone, head_params, fc_options=None):
    """Backbone group(s) (gradient-norm clipped, as arcface_torch) and the FC group.

    With `no_weight_decay_on_bn_bias`, the backbone is two groups and OneFlow clips each
    group's norm separately (a documented difference from one global backbone norm).
    """
    named = [(n, p) for n, p in backbone.named_parameters() if p.requires_grad]
    if opt_cfg.no_weight_decay_on_bn_bias:
        groups = [{"params": [p for n, p in named if not _no_decay(n, p)]},
                  {"params": [p for n, p in named if _no_decay(n, p)], "weight_decay": 0.0}]
    else:
        groups = [{"params": [p for _, p in named]}]
    groups = [g for g in groups if g["params"]]
    if opt_cfg.clip_grad_norm > 0:
        for g in groups:
            g.update(clip_grad_max_norm=opt_cfg.clip_grad_norm, clip_grad_norm_type=2.0)
    fc = {"params": [p for p in head_params if p.requires_grad]}
    fc.update(fc_options or {})
    return groups + [fc]


def build_optimizer(opt_cfg, backbone, head_params, fc_options=None):
    groups = param_groups(opt_cfg, backbone, head_params, fc_options)
    if opt_cfg.name == "adamw":
        return flow.optim.AdamW(groups, lr=opt_cfg.lr, betas=tuple(opt_cfg.betas),
                                weight_decay=opt_cfg.weight_decay)
    return flow.optim.SGD(groups, lr=opt_cfg.lr, momentum=opt_cfg.momentum, weight_decay=opt_cfg.weight_decay)


def build_head_and_optimizer(cfg, backbone, num_classes, global_batch):
    """The FC head (class-split, PartialFC) and one optimizer over backbone and head."""
    head = PartialFC(
        num_classes, cfg.Model.embedding_size, margin=cfg.Loss.margin, scale=cfg.Loss.scale,
        sample_rate=cfg.Loss.sample_rate, device=cfg.Global.device, global_batch=global_batch,
        sparse_update=cfg.Optimizer.sparse_fc_update, seed=cfg.Global.seed,
    )
    fc_options, head.row_decay = sparse_fc_options(cfg.Optimizer) if head.sparse_update else ({}, 0.0)
    return head, build_optimizer(cfg.Optimizer, backbone, head.parameters(), fc_options)


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
