"""Optimizer and learning-rate schedule: SGD(momentum) or AdamW, warm-up + polynomial decay.

The schedule is built from OneFlow's own schedulers (LinearLR then PolynomialLR inside a
SequentialLR) because nn.Graph compiles those into the step; `lr_at` is the same formula in
plain Python, used for logging and as the reference in tests.

Gradient clipping bounds ONE norm over all the backbone's parameters (PLSC's
ClipGradByGlobalNorm, arcface_torch's clip_grad_norm_), also when the backbone is two groups
(decayed / not decayed). nn.Graph clips each optimizer conf on its own, so `build_optimizer`
has the graph merge the backbone's groups into one conf: SGD's decay is per variable already
(`l2`), AdamW's no-decay variables are excluded by name from the merged conf's decay
(`weight_decay_conf.excludes`). Eager mode clips the same parameters together (`clip_groups`).
"""
import bisect
import math
import re
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import oneflow as flow
import oneflow.nn as nn
from oneflow.optim.optimizer import ParamGroup

from of_face.config import OptimizerCfg
from of_face.models import no_weight_decay
from of_face.oneflow_compat import LRScheduler, rewrite_graph_conf, sync

Head = Union[nn.Module, Iterable[flow.Tensor]]  # a head module, or its parameters (tests)


def _head_group(head: Head) -> Dict[str, Any]:
    """The FC group a head asks for (`param_group()`), or plain parameters (tests pass those)."""
    if hasattr(head, "param_group"):
        return head.param_group()
    params = head.parameters() if isinstance(head, flow.nn.Module) else head
    return {"params": [p for p in params if p.requires_grad]}


def param_groups(opt_cfg: OptimizerCfg, backbone: nn.Module, head: Head) -> List[Dict[str, Any]]:
    """Backbone group(s) (one gradient norm clipped over all of them) and the FC group.

    With `no_weight_decay_on_bn_bias`, the backbone is two groups (the names the model lists in
    `no_weight_decay()` get none); both carry CLIP_TAG, so they share one clipped norm.
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
            g.update(clip_grad_max_norm=opt_cfg.clip_grad_norm, clip_grad_norm_type=2.0, **{CLIP_TAG: True})
    return groups + [_head_group(head)]


CLIP_TAG = "one_clip_norm"  # groups whose gradients are clipped by one norm together


def clip_groups(optimizer: flow.optim.Optimizer) -> List[ParamGroup]:
    """The param groups that share one clipped gradient norm (the backbone's)."""
    return [g for g in optimizer.param_groups if CLIP_TAG in g]


def build_optimizer(opt_cfg: OptimizerCfg, backbone: nn.Module, head: Head) -> flow.optim.Optimizer:
    """One optimizer over the backbone and the head (a head module, or its parameters)."""
    groups = param_groups(opt_cfg, backbone, head)
    if opt_cfg.name == "adamw":
        opt = flow.optim.AdamW(groups, lr=opt_cfg.lr, betas=tuple(opt_cfg.betas), weight_decay=opt_cfg.weight_decay)
    else:
        opt = flow.optim.SGD(groups, lr=opt_cfg.lr, momentum=opt_cfg.momentum, weight_decay=opt_cfg.weight_decay)
    one_clip_conf_in_graph(opt)
    return opt


def one_clip_conf_in_graph(optimizer: flow.optim.Optimizer) -> None:
    """Have nn.Graph compile the clipped groups as ONE optimizer conf (one global norm).

    OneFlow's clip_by_global_norm works per optimizer conf, and each param group becomes one
    conf. After OneFlow writes the confs, the clipped groups' variables move into the conf of
    the group with the largest decay; a variable of a group with another decay (0: the
    no-decay group) is excluded from that conf's decoupled decay by its exact name (AdamW;
    SGD's decay is already per variable). Eager mode does not use this (see `clip_groups`).
    """
    rewrite_graph_conf(optimizer, _merge_clipped_confs)


def _merge_clipped_confs(optimizer: flow.optim.Optimizer, train_conf: Any, vars_conf: Any,
                         confs: List[Any]) -> List[Any]:
    """The rewrite of `one_clip_conf_in_graph`: `confs` are this optimizer's confs, the last
    ones of `train_conf.optimizer_conf`."""
    first = len(train_conf.optimizer_conf) - len(confs)
    tagged = [i for i, g in enumerate(optimizer.param_groups) if CLIP_TAG in g]
    if len(tagged) < 2:
        return confs
    groups = optimizer.param_groups
    keep = max(tagged, key=lambda i: groups[i]["weight_decay"])
    target = confs[keep]
    for i in tagged:
        if i == keep:
            continue
        if groups[i]["weight_decay"] != groups[keep]["weight_decay"] and target.HasField("weight_decay_conf"):
            if groups[i]["weight_decay"] != 0.0:  # only "decayed" and "not decayed" can share a conf
                raise ValueError("one clipped norm over groups of two non-zero decays is not supported")
            names = [vars_conf[p].name for p in groups[i].parameters if p.requires_grad]
            target.weight_decay_conf.excludes.pattern.extend(f"^{re.escape(n)}$" for n in names)
        target.variable_op_names.extend(confs[i].variable_op_names)
    for i in sorted((i for i in tagged if i != keep), reverse=True):
        del train_conf.optimizer_conf[first + i]
    return [train_conf.optimizer_conf[j] for j in range(first, len(train_conf.optimizer_conf))]


def build_scheduler(optimizer: flow.optim.Optimizer, total_steps: int, warmup_steps: int,
                    power: float) -> LRScheduler:
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


# ----------------------------------------------------------------------------- sparse AdamW
# FC group option set by heads.sparse_fc_options: the group's kept rows get PLSC's bias correction
SPARSE_BIAS_CORRECTION = "sparse_adam_bias_correction"


def sparse_bias_correction_group(optimizer: flow.optim.Optimizer) -> Optional[ParamGroup]:
    """The FC group whose sparse AdamW update the steppers bias-correct, if any."""
    return next((g for g in optimizer.param_groups if SPARSE_BIAS_CORRECTION in g), None)


def scheduled_lr(scheduler: LRScheduler, base_lr: float, step: int) -> float:
    """The LR OneFlow's `scheduler` gives optimizer step `step` (0-based), without stepping it:
    SequentialLR's milestone arithmetic, then the active scheduler's own formula."""
    milestones = getattr(scheduler, "milestones", None)
    if milestones is None or not hasattr(scheduler, "schedulers"):
        return scheduler.get_lr(base_lr, step)
    i = bisect.bisect_right(milestones, step)
    if i > 0 and scheduler.interval_rescaling[i - 1]:
        step -= milestones[i - 1]
    return scheduler.schedulers[i].get_lr(base_lr, step)


def bias_correct_kept_rows(weight: flow.Tensor, m: flow.Tensor, v: flow.Tensor, kept: flow.Tensor, lr: float,
                           step: int, betas: Tuple[float, float], eps: float) -> None:
    """PLSC's AdamW bias correction, applied afterwards to the FC rows kept at optimizer step `step`.

    OneFlow 0.9's indexed_slices_adam_update has no bias correction (its rewrite pass drops the
    correction inputs; measured: the update equals uncorrected Adam), and no compiled LR schedule
    can express (1 - b2^t)^0.5 / (1 - b1^t). Both kernels leave, on a kept row,
        w' = w (1 - lr wd) - lr m / (sqrt(v) + eps)                 (m, v: this step's moments)
    while PLSC's AdamW (Paddle's adamw kernel, state['step'] = t counted per optimizer step) gives
        w* = w (1 - lr wd) - lr m / (c1 (sqrt(v / c2) + eps)),   c1 = 1 - b1^t, c2 = 1 - b2^t,
    so w* = w' + lr (m / (sqrt(v) + eps) - m / (c1 (sqrt(v / c2) + eps))), which needs only the
    kept rows' m and v. Each rank corrects its own rows in its local shard, in place (the graph
    reads the same variable on its next step); unsampled rows are untouched, as in PLSC.
    Under AMP (train/amp_sparse.py) a step skipped for non-finite gradients does not count in t
    (PLSC's GradScaler skips optimizer.step, so its state['step'] stays): the caller passes the
    number of FC updates actually made.
    """
    b1, b2 = betas
    c1, c2 = 1.0 - b1 ** step, 1.0 - b2 ** step
    idx = kept.to_local().reshape(-1).to(flow.int64)  # this rank's kept local rows
    w, mk, vk = weight.to_local(), m.to_local()[idx], v.to_local()[idx]
    with flow.no_grad():
        root = flow.sqrt(vk)
        correction = mk / (root + eps) - mk / (c1 * (root / math.sqrt(c2) + eps))
        w[idx] = w[idx] + lr * correction


class SparseAdamCorrection:
    """Sparse AdamW's bias correction of the kept FC rows, as one part every stepper uses.

    group:     the FC's param group (its betas, eps, initial_lr), see sparse_bias_correction_group
    scheduler: the run's LR schedule, read without stepping it (`scheduled_lr`)
    """

    def __init__(self, group: ParamGroup, scheduler: LRScheduler):
        self.group, self.scheduler = group, scheduler

    @classmethod
    def of(cls, optimizer: flow.optim.Optimizer, scheduler: LRScheduler) -> Optional["SparseAdamCorrection"]:
        """The correction for `optimizer`'s sparse AdamW FC group, or None when it has none."""
        group = sparse_bias_correction_group(optimizer)
        return None if group is None else cls(group, scheduler)

    def apply(self, weight: flow.Tensor, m: flow.Tensor, v: flow.Tensor, kept: flow.Tensor, lr: float,
              updates: int) -> None:
        """Correct the kept rows after the `updates`-th FC update, made with learning rate `lr`."""
        g = self.group
        bias_correct_kept_rows(weight, m, v, kept, lr, updates, g["betas"], g["eps"])

    def after_compiled_step(self, weight: flow.Tensor, moments: Dict[str, flow.Tensor], kept: flow.Tensor,
                            step: int, updates: int) -> None:
        """After a compiled job updated the FC at optimizer step `step` (0-based): correct with
        the schedule's LR of that step and the job's live moments ({"m", "v"})."""
        # The job's variables are read and written through their local tensors, which the VM
        # does not order against the compiled step: wait for the step, then for the writes
        # (measured: without the first wait, step 2 reads stale moments).
        sync()
        self.apply(weight, moments["m"], moments["v"], kept,
                   scheduled_lr(self.scheduler, self.group["initial_lr"], step), updates)
        sync()
