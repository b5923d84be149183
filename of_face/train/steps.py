"""One training step, two ways: compiled (`GraphStep`, here) or eager (`EagerStep`,
train/eager_step.py). Same modules, same tensors.

Both take a global batch (images, labels split along the batch) and return the global mean
loss; the trainer loop above them does not know which one it drives (`Stepper`). Every stepper
is built the same way, `Stepper(StepParts, StepOptions)`: the TrainingSystem's modules,
optimizer and LR schedule, and one set of options. Each also owns its optimizer state in a form
that does not depend on the mode (`StepperState`): slots named like eager OneFlow's
(`momentum_buf`, `exp_avg`, `exp_avg_sq`) per parameter name, plus nn.Graph's own variables; the
translation between nn.Graph's names and those lives in the steppers, so a checkpoint written in
one mode resumes in the other. What the steppers share is a part each uses, not a copy:
`FCJob` (the compiled job that updates the FC: its slots and step counter) and
`optim.SparseAdamCorrection` (sparse AdamW's bias correction of the kept rows).

Activation checkpointing (`StepOptions.checkpointing`, graph mode only): every block the backbone
names in `checkpoint_blocks()` (residual / transformer blocks) is marked with OneFlow 0.9's
per-module switch `proxy.to(GraphModule).activation_checkpointing = True`. OneFlow then keeps
only each block's input for backward and recomputes the block's forward ops there (its compiled
job gains ops named `Sys-Checkpointing-Fake-Fw-Op_*`): less activation memory for one extra
forward pass.
"""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Protocol, Tuple

import numpy as np
import oneflow as flow
import oneflow.nn as nn
from oneflow.nn.graph import GraphModule

from of_face import parallel
from of_face.config import Config
from of_face.models import checkpoint_blocks
from of_face.oneflow_compat import LRScheduler, enable_sparse_updates, sync
from of_face.train.optim import SparseAdamCorrection

# nn.Graph's optimizer-state suffixes <-> eager optimizer state keys
GRAPH_SLOTS = {"momentum": "momentum_buf", "m": "exp_avg", "v": "exp_avg_sq"}
EAGER_SLOTS = {v: k for k, v in GRAPH_SLOTS.items()}
OPTIMIZER_SLOTS = {"SGD": ("momentum_buf",), "AdamW": ("exp_avg", "exp_avg_sq")}
# nn.Graph's optimizer step counter: drives the in-graph LR schedule and AdamW's bias correction
TRAIN_STEP_VAR = "System-Train-TrainStep"
GRAPH_NAME = "{graph}"  # stands for the graph's own name in saved variable names
LOSS_SCALE_GROWTH_INTERVAL = 2000  # AMP: steps without overflow before the loss scale doubles


def checkpoint_block_names(backbone: nn.Module) -> List[str]:
    """Dotted names of the backbone's blocks that activation checkpointing marks."""
    return checkpoint_blocks(backbone)


@dataclass(frozen=True)
class StepParts:
    """What a stepper steps: the TrainingSystem's modules, optimizer and LR schedule.

    optimizer/scheduler may be None for a job with nothing of the backbone to train
    (train/amp_sparse.py); the steppers themselves always get both.
    """
    backbone: nn.Module
    head: nn.Module  # PartialFC (heads/partial_fc.py)
    optimizer: Optional[flow.optim.Optimizer]
    scheduler: Optional[LRScheduler]

    @property
    def trains_backbone(self) -> bool:
        """Whether a backbone parameter trains (else nothing needs the embeddings' gradient)."""
        return any(p.requires_grad for p in self.backbone.parameters())


@dataclass(frozen=True)
class StepOptions:
    """How a step runs (one set for every stepper; eager mode refuses what it cannot do).

    amp:           FP16 (O1) with a dynamic loss scale starting at `init_scale` (graph mode)
    checkpointing: activation checkpointing of the backbone's blocks (graph mode)
    accum_steps:   micro-batches whose gradients one optimizer step averages
    fc_chunks:     K > 1: the FC head streamed in K class chunks (train/streamed_step.py)
    """
    amp: bool = False
    init_scale: float = 65536.0
    checkpointing: bool = False
    accum_steps: int = 1
    fc_chunks: int = 1

    @classmethod
    def from_config(cls, cfg: Config) -> "StepOptions":
        return cls(amp=cfg.AMP.enable, init_scale=cfg.AMP.init_scale,
                   checkpointing=cfg.Model.activation_checkpointing, accum_steps=cfg.Optimizer.accum_steps)


@dataclass
class StepperState:
    """A stepper's optimizer state, the same shape in graph and eager mode.

    slots:     {(parameter name, eager slot name): tensor placed like the parameter}
    variables: nn.Graph's other variables by name, with GRAPH_NAME for the graph's own name
               (step counter, AMP loss scale): global tensors when read, numpy when loaded
    step:      optimizer steps taken (also drives PartialFC's per-step sampling noise)
    scheduler: eager mode's LR-scheduler state (informational; the schedule is replayed on load)
    """
    slots: Dict[Tuple[str, str], Any] = field(default_factory=dict)
    variables: Dict[str, Any] = field(default_factory=dict)
    step: int = 0
    scheduler: Optional[dict] = None


class Stepper(Protocol):
    """What the trainer, the checkpoint and the tests drive: `STEPPERS[mode](parts, options)`."""
    steps_done: int

    def __call__(self, images: flow.Tensor, labels: flow.Tensor) -> flow.Tensor: ...

    def loss_scale(self) -> Optional[float]: ...

    def state_dict(self) -> StepperState: ...

    def load_state_dict(self, state: StepperState) -> None: ...


def named_parameters(backbone: nn.Module, head: nn.Module) -> Dict[str, flow.Tensor]:
    """Parameters by the names nn.Graph gives them (its attributes are `backbone` and `head`)."""
    named = {f"backbone.{n}": p for n, p in backbone.named_parameters()}
    named.update({f"head.{n}": p for n, p in head.named_parameters()})
    return named


class TrainGraph(nn.Graph):
    """backbone -> head -> loss -> backward -> optimizer + LR schedule, compiled as one job."""

    def __init__(self, parts: StepParts, options: StepOptions, return_kept: bool = False):
        super().__init__()
        self.backbone = parts.backbone
        self.head = parts.head
        self.return_kept = return_kept  # also output the kept centres (sparse AdamW's bias correction)
        self.trains = parts.optimizer is not None  # (None: nothing of the backbone to train, train/amp_sparse.py)
        self.loss_scaled = options.amp and self.trains  # AMP's dynamic loss scale is a variable of this job
        self.checkpointed_blocks = checkpoint_block_names(parts.backbone) if options.checkpointing else []
        if options.checkpointing and not self.checkpointed_blocks:
            raise ValueError(f"activation checkpointing: {type(parts.backbone).__name__} has no block to checkpoint")
        for name in self.checkpointed_blocks:
            proxy = self.backbone
            for part in name.split("."):
                proxy = getattr(proxy, part)
            proxy.to(GraphModule).activation_checkpointing = True
        if self.trains:
            self.add_optimizer(parts.optimizer, lr_sch=parts.scheduler)
        sparse_variables = getattr(parts.head, "sparse_variables", ())
        if sparse_variables:
            # gather(head.weight) + its optimizer -> indexed_slices_{momentum,adam}_update:
            # only the kept rows and their optimizer state are touched (see heads/partial_fc.py)
            enable_sparse_updates(self, [f"head.{name}" for name in sparse_variables])
        if options.accum_steps > 1:
            # the batch fed in is accum_steps micro-batches (split per rank along dim 0); OneFlow
            # averages their gradients (the loss / k) and steps optimizer and LR schedule once
            self.config.set_gradient_accumulation_steps(options.accum_steps)
        if options.amp:
            self.config.enable_amp(True)
        if self.loss_scaled:
            self.set_grad_scaler(flow.amp.GradScaler(init_scale=options.init_scale,
                                                     growth_interval=LOSS_SCALE_GROWTH_INTERVAL))

    def build(self, images: flow.Tensor, labels: flow.Tensor, noise: Optional[flow.Tensor] = None) -> Any:
        """The loss ((loss, kept positions) with `return_kept`)."""
        out = self.head.objective(self.backbone(images), labels, noise)
        out.objective.backward()
        return (out.loss, out.kept) if self.return_kept else out.loss


class FCJob:
    """The compiled job whose optimizer updates the FC weight (`head.weight`): its optimizer
    slots and step counter, live variables of the job found once. GraphStep: the training graph
    itself; AMP + sparse (train/amp_sparse.py): a job of its own."""

    def __init__(self, graph: nn.Graph, placement: flow.placement):
        self.graph, self.placement = graph, placement
        self._moments: Optional[Dict[str, flow.Tensor]] = None
        self._step_var: Optional[flow.Tensor] = None

    def moments(self) -> Dict[str, flow.Tensor]:
        """The Adam moments of the FC weight ({"m", "v"})."""
        if self._moments is None:
            self._moments = {n.rpartition("-")[2]: t for n, t in self.graph.state_dict().items()
                             if n.startswith("head.weight-")}
        return self._moments

    def slots(self) -> Dict[Tuple[str, str], flow.Tensor]:
        """The FC weight's optimizer slots by eager name (none before the job is compiled)."""
        if not self.graph.is_compiled:
            return {}
        out = {}
        for name, t in self.graph.state_dict().items():
            param, _, suffix = name.rpartition("-")
            if param == "head.weight" and suffix in GRAPH_SLOTS:
                out[(param, GRAPH_SLOTS[suffix])] = t
        return out

    def load_slots(self, slots: Dict[Tuple[str, str], Any]) -> None:
        """Before the first call: hand the job the FC weight's slots."""
        self.graph.load_state_dict({f"{p}-{EAGER_SLOTS[s]}": t for (p, s), t in slots.items()}, strict=False)

    def set_step(self, step: int) -> None:
        """The job's step counter := `step`, so its compiled LR schedule gives that step's LR."""
        if not self.graph.is_compiled:  # handed over at compilation, like a resumed variable
            value = parallel.broadcast_array(np.array([step], np.int64), self.placement)
            self.graph.load_state_dict({TRAIN_STEP_VAR: value}, strict=False)
            return
        if self._step_var is None:
            self._step_var = self.graph.state_dict()[TRAIN_STEP_VAR]
        sync()  # (local writes are not ordered against the jobs)
        self._step_var.to_local().fill_(step)
        sync()


class GraphStep:
    """The compiled step: one TrainGraph updates backbone and FC."""

    def __init__(self, parts: StepParts, options: StepOptions):
        self.parts, self.options = parts, options
        self.placement = parts.head.weight.placement  # all ranks
        self.steps_done = 0  # optimizer steps taken: picks the sampling noise (set on resume)
        self.graph, self.fc_job, self.correction = self._jobs()

    def _jobs(self) -> Tuple[TrainGraph, FCJob, Optional[SparseAdamCorrection]]:
        """(the training job, the job that updates the FC, sparse AdamW's correction or None)."""
        correction = SparseAdamCorrection.of(self.parts.optimizer, self.parts.scheduler)
        graph = TrainGraph(self.parts, self.options, return_kept=correction is not None)
        return graph, FCJob(graph, self.placement), correction

    def __call__(self, images: flow.Tensor, labels: flow.Tensor) -> flow.Tensor:
        head = self.parts.head
        if head.sampling:
            noise = head.step_noise(self.steps_done, self.options.accum_steps)
            loss = self.graph(images, labels, noise)
        else:
            loss = self.graph(images, labels)
        self.steps_done += 1
        if self.correction is not None:
            loss, kept = loss
            self.correction.after_compiled_step(head.weight, self.fc_job.moments(), kept, self.steps_done - 1,
                                                self.steps_done)
        return loss.mean() if self.options.accum_steps > 1 else loss  # one loss per micro-batch

    def loss_scale(self) -> Optional[float]:
        """AMP's current dynamic loss scale on rank 0 (None elsewhere, and without AMP).

        The live scale is a variable of the compiled job, exposed by `nn.Graph.state_dict()` as
        `System-Train-DynamicLossScale-<graph>-LossScale`: one element placed on rank 0 only. It is
        read locally, without communication, so any rank may call this alone.
        """
        if not self.graph.loss_scaled:
            return None
        for name, value in self.graph.state_dict().items():
            if name.endswith("-LossScale") and not isinstance(value, dict):
                local = value.to_local().numpy().reshape(-1)
                return float(local[0]) if local.size else None
        return None

    def state_dict(self) -> StepperState:
        """nn.Graph's variables: optimizer slots (`<param>-momentum`, `-m`, `-v`) by eager name,
        the rest (step counter, AMP's loss scale) under their names with GRAPH_NAME."""
        named = named_parameters(self.parts.backbone, self.parts.head)
        state = StepperState(step=self.steps_done)
        for name, t in self.graph.state_dict().items():
            if isinstance(t, dict) or "FreeEagerTensor" in name:  # constants (PartialFC's pad bias): rebuilt
                continue
            param, _, suffix = name.rpartition("-")
            if param in named and suffix in GRAPH_SLOTS:
                state.slots[(param, GRAPH_SLOTS[suffix])] = t
            else:
                state.variables[name.replace(self.graph.name, GRAPH_NAME)] = t
        return state

    def load_state_dict(self, state: StepperState) -> None:
        """Before the first step: hand nn.Graph the slots and variables (numpy variables are
        broadcast; slots come placed like their parameters)."""
        graph = self.graph
        values = {f"{param}-{EAGER_SLOTS[slot]}": t for (param, slot), t in state.slots.items()}
        ref = next(iter(self.parts.backbone.parameters()))
        for name, value in state.variables.items():
            name = name.replace(GRAPH_NAME, graph.name)
            if "DynamicLossScale" in name and not graph.loss_scaled:
                continue  # saved under AMP, resumed without: nothing to restore
            values[name] = parallel.broadcast_array(value, ref.placement) if isinstance(value, np.ndarray) else value
        graph.load_state_dict(values, strict=False)
        self.steps_done = int(state.step)
