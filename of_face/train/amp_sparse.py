"""AMP together with SparseMomentum, in graph mode: the FC update leaves the loss-scaled graph.

OneFlow 0.9's indexed-slices rewrite refuses an update that carries AMP's dynamic loss scale
(`scale_by_tensor`, `skip_if`): under `set_grad_scaler` the FC would be updated densely, every
row and its momentum moving each step. So the step is two compiled jobs on the same variables:

1. `AmpTrainGraph` (FP16 O1, dynamic loss scale): backbone -> head -> loss; backward reaches
   only the backbone (the head reads its kept rows detached), whose optimizer unscales, skips
   non-finite steps on every rank and adjusts the scale, as in plain AMP. The head also returns,
   computed in the forward and unscaled, the kept rows' gradient (`objective_and_row_grad`).
2. `FCUpdateGraph` (FP32, no scaler): `index_select(weight, 0, kept)` times that gradient,
   backward, and the FC's own optimizer, which compiles to `indexed_slices_*_update`: only the
   kept rows and their optimizer state change.

The host runs job 2 only when job 1 kept its step: the loss is finite and the loss scale did not
drop (the scaler halves it exactly when it skips; rank 0 holds it, and one all-gather gives every
rank the same answer). Job 2's step counter is set to the global step before each call, so the
FC's learning rate follows the same schedule as the backbone's although skipped steps never
reach job 2. Sparse AdamW's bias correction counts the FC updates actually made (PLSC's
GradScaler skips optimizer.step, so its state['step'] stays on a skipped step).
"""
import copy
from dataclasses import replace
from typing import List, Optional, Tuple

import numpy as np
import oneflow as flow
import oneflow.nn as nn

from of_face import parallel
from of_face.oneflow_compat import LRScheduler, enable_sparse_updates
from of_face.train.optim import SparseAdamCorrection, one_clip_conf_in_graph
from of_face.train.steps import FCJob, GraphStep, StepOptions, StepParts, StepperState, TrainGraph

# (optimizer, its scheduler) of one job; (None, None): nothing to train in it
OptimizerPair = Tuple[Optional[flow.optim.Optimizer], Optional[LRScheduler]]


class AmpTrainGraph(TrainGraph):
    """Job 1: the backbone's AMP step; returns (loss, kept positions, kept rows' gradient table)."""

    def build(self, images: flow.Tensor, labels: flow.Tensor,
              noise: flow.Tensor) -> Tuple[flow.Tensor, flow.Tensor, flow.Tensor]:
        out, row_grad = self.head.objective_and_row_grad(self.backbone(images), labels, noise)
        if self.trains:  # (no backbone parameters: forward only)
            out.objective.backward()
        return out.loss, out.kept, row_grad


class FCUpdateGraph(nn.Graph):
    """Job 2: the FC's sparse update from the kept rows' (unscaled) gradient."""

    def __init__(self, head: nn.Module, optimizer: flow.optim.Optimizer, scheduler: LRScheduler):
        super().__init__()
        self.head = head
        self.add_optimizer(optimizer, lr_sch=scheduler)
        enable_sparse_updates(self, ["head.weight"])

    def build(self, row_grad: flow.Tensor, kept: flow.Tensor) -> flow.Tensor:
        rows = flow.index_select(self.head.weight, 0, kept)  # [k, world, dim]: each rank its own rows
        link = (rows * row_grad).sum()  # d link / d rows = row_grad
        link.backward()
        return link


def split_optimizer(optimizer: flow.optim.Optimizer, scheduler: LRScheduler,
                    head: nn.Module) -> List[OptimizerPair]:
    """[(backbone optimizer, its scheduler), (FC optimizer, its scheduler)]: the run's groups,
    options and LR schedule, as two optimizers nn.Graph can hold apart (OneFlow ties a scheduler
    to one optimizer, and one optimizer to the graph that holds its variables)."""
    fc = {id(p) for p in head.parameters()}
    parts = ([], [])
    for g in optimizer.param_groups:
        parts[any(id(p) in fc for p in g.parameters)].append(dict(g.options, params=list(g.parameters)))
    pairs = []
    for groups in parts:
        if not groups:  # (an FC-only system: the identity backbone of the benches and tests)
            pairs.append((None, None))
            continue
        opt = type(optimizer)(groups)
        one_clip_conf_in_graph(opt)
        pairs.append((opt, scheduler_like(scheduler, opt)))
    return pairs


def scheduler_like(scheduler: LRScheduler, optimizer: flow.optim.Optimizer) -> LRScheduler:
    """A copy of `scheduler` (and of the schedulers it chains) driving `optimizer`."""
    clone = copy.copy(scheduler)
    clone.optimizer = optimizer
    if getattr(clone, "schedulers", None):
        clone.schedulers = [scheduler_like(s, optimizer) for s in clone.schedulers]
    return clone


class AmpSparseStep(GraphStep):
    """GraphStep for AMP + sparse FC updates (see the module docstring)."""

    def __init__(self, parts: StepParts, options: StepOptions):
        self.fc_updates = 0  # FC steps taken (skipped steps excluded): sparse AdamW's t
        self._scale = float(options.init_scale)  # the loss scale after the last step
        super().__init__(parts, options)

    def _jobs(self) -> Tuple[TrainGraph, FCJob, Optional[SparseAdamCorrection]]:
        parts = self.parts
        (opt1, sch1), (opt2, sch2) = split_optimizer(parts.optimizer, parts.scheduler, parts.head)
        correction = SparseAdamCorrection.of(opt2, parts.scheduler)
        graph = AmpTrainGraph(replace(parts, optimizer=opt1, scheduler=sch1), self.options)
        self.fc_graph = FCUpdateGraph(parts.head, opt2, sch2)
        return graph, FCJob(self.fc_graph, self.placement), correction

    def __call__(self, images: flow.Tensor, labels: flow.Tensor) -> flow.Tensor:
        head = self.parts.head
        noise = head.step_noise(self.steps_done, self.options.accum_steps)
        loss, kept, row_grad = self.graph(images, labels, noise)
        step = self.steps_done
        self.steps_done += 1
        if not self._scaler_kept(loss):
            return loss  # job 1 skipped its update on every rank: so does the FC
        self.fc_job.set_step(step)
        self.fc_graph(row_grad, kept)
        self._fc_updated(kept, step)
        return loss

    def _scaler_kept(self, loss: flow.Tensor) -> bool:
        """Whether the loss-scaled job kept this step, the same answer on every rank: the loss is
        finite and the scale did not drop (the scaler halves it exactly when it skips)."""
        scale = self.loss_scale()
        dropped = scale is not None and scale < self._scale
        self._scale = scale if scale is not None else self._scale
        finite = bool(np.isfinite(parallel.to_numpy(loss)).all())
        return parallel.all_ok(finite and not dropped)

    def _fc_updated(self, kept: flow.Tensor, step: int) -> None:
        """After the FC's update of optimizer step `step`: count it, then sparse AdamW's correction."""
        self.fc_updates += 1
        if self.correction is not None:
            self.correction.after_compiled_step(self.parts.head.weight, self.fc_job.moments(), kept, step,
                                                self.fc_updates)

    def _updates_missing(self, state: StepperState) -> int:
        """fc_updates of a state saved without it (another stepper's)."""
        return self.fc_updates

    def state_dict(self) -> StepperState:
        state = super().state_dict() if self.graph is not None else StepperState(step=self.steps_done)
        state.slots.update(self.fc_job.slots())
        state.variables["fc_updates"] = np.array([self.fc_updates], np.int64)
        return state

    def load_state_dict(self, state: StepperState) -> None:
        fc_slots = {k: v for k, v in state.slots.items() if k[0] == "head.weight"}
        rest = StepperState({k: v for k, v in state.slots.items() if k[0] != "head.weight"},
                            {k: v for k, v in state.variables.items() if k != "fc_updates"},
                            state.step, state.scheduler)
        if self.graph is not None:
            super().load_state_dict(rest)
        self.steps_done = int(state.step)
        if "fc_updates" in state.variables:
            self.fc_updates = int(np.asarray(state.variables["fc_updates"]).reshape(-1)[0])
        else:
            self.fc_updates = self._updates_missing(state)
        if fc_slots:
            self.fc_job.load_slots(fc_slots)
