"""One training step, two ways: compiled (`nn.Graph`) or eager. Same modules, same tensors.

Both take a global batch (images, labels split along the batch) and return the global mean
loss; the trainer loop above them does not know which one it drives (`Stepper`). Each also
owns its optimizer state in a form that does not depend on the mode (`StepperState`): slots
named like eager OneFlow's (`momentum_buf`, `exp_avg`, `exp_avg_sq`) per parameter name, plus
nn.Graph's own variables; the translation between nn.Graph's names and those lives here, so a
checkpoint written in one mode resumes in the other.

Activation checkpointing (`checkpointing=True`, graph mode only): every block the backbone
names in `checkpoint_blocks()` (residual / transformer blocks) is marked with OneFlow 0.9's
per-module switch `proxy.to(GraphModule).activation_checkpointing = True`. OneFlow then keeps
only each block's input for backward and recomputes the block's forward ops there (its compiled
job gains ops named `Sys-Checkpointing-Fake-Fw-Op_*`): less activation memory for one extra
forward pass.
"""
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Protocol, Tuple

import numpy as np
import oneflow as flow
import oneflow.nn as nn
from oneflow.nn.graph import GraphModule

from of_face import parallel
from of_face.models import checkpoint_blocks
from of_face.train.optim import bias_correct_kept_rows, clip_groups, scheduled_lr, sparse_bias_correction_group

# nn.Graph's optimizer-state suffixes <-> eager optimizer state keys
GRAPH_SLOTS = {"momentum": "momentum_buf", "m": "exp_avg", "v": "exp_avg_sq"}
EAGER_SLOTS = {v: k for k, v in GRAPH_SLOTS.items()}
OPTIMIZER_SLOTS = {"SGD": ("momentum_buf",), "AdamW": ("exp_avg", "exp_avg_sq")}
# nn.Graph's optimizer step counter: drives the in-graph LR schedule and AdamW's bias correction
TRAIN_STEP_VAR = "System-Train-TrainStep"
GRAPH_NAME = "{graph}"  # stands for the graph's own name in saved variable names


def checkpoint_block_names(backbone):
    """Dotted names of the backbone's blocks that activation checkpointing marks."""
    return checkpoint_blocks(backbone)


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
    """What the trainer, the checkpoint and the tests drive: `STEPPERS[mode](...)`."""
    steps_done: int

    def __call__(self, images: flow.Tensor, labels: flow.Tensor) -> flow.Tensor: ...

    def loss_scale(self) -> Optional[float]: ...

    def state_dict(self) -> StepperState: ...

    def load_state_dict(self, state: StepperState) -> None: ...


def named_parameters(backbone, head) -> Dict[str, flow.Tensor]:
    """Parameters by the names nn.Graph gives them (its attributes are `backbone` and `head`)."""
    named = {f"backbone.{n}": p for n, p in backbone.named_parameters()}
    named.update({f"head.{n}": p for n, p in head.named_parameters()})
    return named


class TrainGraph(nn.Graph):
    """backbone -> head -> loss -> backward -> optimizer + LR schedule, compiled as one job."""

    def __init__(self, backbone, head, optimizer, scheduler, amp=None, checkpointing=False, accum_steps=1,
                 return_kept=False):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.return_kept = return_kept  # also output the kept centres (sparse AdamW's bias correction)
        self.checkpointed_blocks = checkpoint_block_names(backbone) if checkpointing else []
        if checkpointing and not self.checkpointed_blocks:
            raise ValueError(f"activation checkpointing: {type(backbone).__name__} has no block to checkpoint")
        for name in self.checkpointed_blocks:
            proxy = self.backbone
            for part in name.split("."):
                proxy = getattr(proxy, part)
            proxy.to(GraphModule).activation_checkpointing = True
        if optimizer is not None:  # (None: nothing of the backbone to train, see train/amp_sparse.py)
            self.add_optimizer(optimizer, lr_sch=scheduler)
        sparse_variables = getattr(head, "sparse_variables", ())
        if sparse_variables:
            # gather(head.weight) + its optimizer -> indexed_slices_{momentum,adam}_update:
            # only the kept rows and their optimizer state are touched (see heads/partial_fc.py)
            sparse = self.config.proto.indexed_slices_optimizer_conf
            sparse.enable = True
            for name in sparse_variables:
                sparse.include_op_names.op_name.append(f"head.{name}")
        if accum_steps > 1:
            # the batch fed in is accum_steps micro-batches (split per rank along dim 0); OneFlow
            # averages their gradients (the loss / k) and steps optimizer and LR schedule once
            self.config.set_gradient_accumulation_steps(accum_steps)
        if amp is not None and amp.enable:
            self.config.enable_amp(True)
        if amp is not None and amp.enable and optimizer is not None:
            self.set_grad_scaler(flow.amp.GradScaler(init_scale=amp.init_scale, growth_interval=2000))

    def build(self, images, labels, noise=None):
        out = self.head.objective(self.backbone(images), labels, noise)
        out.objective.backward()
        return (out.loss, out.kept) if self.return_kept else out.loss


class EmbedGraph(nn.Graph):
    """Inference: images -> embeddings (backbone in eval mode at compile time)."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def build(self, images):
        return self.backbone(images)


class GraphStep:
    def __init__(self, backbone, head, optimizer, scheduler, amp=None, checkpointing=False, accum_steps=1):
        self.bias_corrected = sparse_bias_correction_group(optimizer)  # sparse AdamW's FC group, if any
        self.graph = TrainGraph(backbone, head, optimizer, scheduler, amp, checkpointing, accum_steps,
                                return_kept=self.bias_corrected is not None)
        self.fc_job = self.graph  # the compiled job whose optimizer updates the FC
        self.backbone, self.head, self.placement = backbone, head, head.weight.placement  # all ranks
        self.scheduler = scheduler
        self.accum_steps = accum_steps
        self.steps_done = 0  # optimizer steps taken: picks the sampling noise (set on resume)

    def __call__(self, images, labels):
        if self.head.sampling:
            noise = self.head.step_noise(self.steps_done, self.accum_steps)
            loss = self.graph(images, labels, noise)
        else:
            loss = self.graph(images, labels)
        self.steps_done += 1
        if self.bias_corrected is not None:
            loss, kept = loss
            g, slots = self.bias_corrected, self._fc_moments()
            # The graph's variables are read and written through their local tensors, which the
            # VM does not order against the compiled step: wait for the step, then for the writes
            # (measured: without the first wait, step 2 reads stale moments).
            flow._oneflow_internal.eager.Sync()
            bias_correct_kept_rows(self.head.weight, slots["m"], slots["v"], kept,
                                   scheduled_lr(self.scheduler, g["initial_lr"], self.steps_done - 1),
                                   self.steps_done, g["betas"], g["eps"])
            flow._oneflow_internal.eager.Sync()
        return loss.mean() if self.accum_steps > 1 else loss  # one loss per micro-batch

    def _fc_moments(self):
        """The Adam moments of the FC weight ({"m", "v"}): live variables of the job that updates
        the FC (`fc_job`: this graph; AMP + sparse has its own, train/amp_sparse.py), found once."""
        if getattr(self, "_moments", None) is None:
            self._moments = {n.rpartition("-")[2]: t for n, t in self.fc_job.state_dict().items()
                             if n.startswith("head.weight-")}
        return self._moments

    def loss_scale(self):
        """AMP's current dynamic loss scale on rank 0 (None elsewhere, and without AMP).

        The live scale is a variable of the compiled job, exposed by `nn.Graph.state_dict()` as
        `System-Train-DynamicLossScale-<graph>-LossScale`: one element placed on rank 0 only. It is
        read locally, without communication, so any rank may call this alone.
        """
        if getattr(self.graph, "_grad_scaler", None) is None:
            return None
        for name, value in self.graph.state_dict().items():
            if name.endswith("-LossScale") and not isinstance(value, dict):
                local = value.to_local().numpy().reshape(-1)
                return float(local[0]) if local.size else None
        return None

    def state_dict(self) -> StepperState:
        """nn.Graph's variables: optimizer slots (`<param>-momentum`, `-m`, `-v`) by eager name,
        the rest (step counter, AMP's loss scale) under their names with GRAPH_NAME."""
        named = named_parameters(self.backbone, self.head)
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
        ref = next(iter(self.backbone.parameters()))
        for name, value in state.variables.items():
            name = name.replace(GRAPH_NAME, graph.name)
            if "DynamicLossScale" in name and getattr(graph, "_grad_scaler", None) is None:
                continue  # saved under AMP, resumed without: nothing to restore
            values[name] = parallel.broadcast_array(value, ref.placement) if isinstance(value, np.ndarray) else value
        graph.load_state_dict(values, strict=False)
        self.steps_done = int(state.step)


class EagerStep:
    def __init__(self, backbone, head, optimizer, scheduler, amp=None, checkpointing=False, accum_steps=1):
        if amp is not None and amp.enable:
            raise NotImplementedError("AMP is available in graph mode only (Global.mode=graph)")
        if checkpointing:
            raise NotImplementedError("activation checkpointing is available in graph mode only (Global.mode=graph)")
        self.backbone, self.head = backbone, head
        self.optimizer, self.scheduler = optimizer, scheduler
        self.bias_corrected = sparse_bias_correction_group(optimizer)  # sparse AdamW's FC group, if any
        self.accum_steps = accum_steps
        self.steps_done = 0  # optimizer steps taken: picks the sampling noise (set on resume)

    def __call__(self, images, labels):
        loss = 0.0
        micro = [self._micro_batches(images), self._micro_batches(labels), [None] * self.accum_steps]
        if self.head.sampling:
            micro[2] = self._micro_batches(self.head.step_noise(self.steps_done, self.accum_steps))
        self.steps_done += 1
        for x, y, noise in zip(*micro):
            out = self.head.objective(self.backbone(x), y, noise)
            (out.objective / self.accum_steps).backward()  # gradients add up to the mean over micro-batches
            loss = loss + out.loss.detach() / self.accum_steps
        if getattr(self.head, "sparse_update", False):  # (no accumulation with it: one kept index)
            kept = self.head.sampled_mask(out.kept)  # [local, 1, 1]: rows of the weight table
            before = self._fc_state()
        clipped = clip_groups(self.optimizer)  # the graph clips inside its update: one norm, as here
        if clipped:
            params = [p for g in clipped for p in g.parameters if p.grad is not None]
            flow.nn.utils.clip_grad_norm_(params, clipped[0]["clip_grad_max_norm"], 2.0)
        self.optimizer.step()
        if getattr(self.head, "sparse_update", False):
            self._keep_unsampled_rows(kept, before)
        if self.bias_corrected is not None:  # the LR of this step: the scheduler steps below
            g, state = self.bias_corrected, self.optimizer._state[self.head.weight]
            bias_correct_kept_rows(self.head.weight, state["exp_avg"], state["exp_avg_sq"], out.kept, g["lr"],
                                   self.steps_done, g["betas"], g["eps"])
        self.optimizer.zero_grad()
        self.scheduler.step()
        return loss

    def loss_scale(self):
        return None  # no AMP in eager mode

    def state_dict(self) -> StepperState:
        """The optimizer's slots by parameter name, its step count (also saved as the graph's
        step counter, so the state resumes in graph mode) and the scheduler's state."""
        named = named_parameters(self.backbone, self.head)
        by_id = {id(p): n for n, p in named.items()}
        state = StepperState(step=self.steps_done, scheduler=self.scheduler.state_dict())
        for p, slots in self.optimizer._state.items():
            if isinstance(p, str) or id(p) not in by_id or not isinstance(slots, dict):
                continue
            for slot, t in slots.items():
                if isinstance(t, flow.Tensor):
                    state.slots[(by_id[id(p)], slot)] = t
        state.variables[TRAIN_STEP_VAR] = np.array([int(self.optimizer._state.get("step", 0))], np.int64)
        return state

    def load_state_dict(self, state: StepperState) -> None:
        """Before the first step: slots into the optimizer, then the LR schedule replayed for the
        saved optimizer step count (the same calls, so the same LR, as an unbroken run)."""
        named = named_parameters(self.backbone, self.head)
        for (param, slot), t in state.slots.items():
            self.optimizer._state.setdefault(named[param], {})[slot] = t
        count = state.variables.get(TRAIN_STEP_VAR)
        count = int(np.asarray(count).reshape(-1)[0]) if count is not None else int(state.step)
        self.optimizer._state["step"] = count
        for _ in range(count):
            self.scheduler.step()
        self.steps_done = int(state.step)

    def _micro_batches(self, t):
        """Each rank's shard cut into accum_steps pieces, as the graph's gradient accumulation does."""
        if self.accum_steps == 1:
            return [t]
        pieces = flow.chunk(t.to_local(), self.accum_steps, dim=0)
        return [p.to_global(placement=t.placement, sbp=t.sbp) for p in pieces]

    def _fc_state(self):
        """The FC weight and its optimizer state tensors (momentum / Adam moments), copied."""
        w = self.head.weight
        state = self.optimizer._state.get(w, {})
        tensors = {k: v for k, v in state.items() if isinstance(v, flow.Tensor) and v.shape == w.shape}
        return {"weight": w.detach().clone(), **{k: v.clone() for k, v in tensors.items()}}

    def _keep_unsampled_rows(self, kept, before):
        """Eager twin of the graph's sparse update: unsampled rows get back weight and state exactly."""
        w = self.head.weight
        state = self.optimizer._state.setdefault(w, {})
        with flow.no_grad():
            w.copy_(flow.where(kept, w, before["weight"]))
            for k, old in before.items():
                if k != "weight":
                    state[k].copy_(flow.where(kept, state[k], old))
            for k, v in state.items():  # state created by this first step: unsampled rows start at 0
                if k not in before and isinstance(v, flow.Tensor) and v.shape == w.shape:
                    v.copy_(flow.where(kept, v, flow.zeros_like(v)))


STEPPERS = {"graph": GraphStep, "eager": EagerStep}
