"""The training step in eager OneFlow: the compiled step's twin (train/steps.py has the contract).

Same modules, same tensors, same numbers as `GraphStep` (tests compare them): gradient
accumulation by micro-batches, one clipped norm over the backbone's groups, and the sparse FC
update reproduced by putting back the unsampled rows' weight and optimizer state after a dense
step. No AMP and no activation checkpointing (graph mode only).
"""
from functools import partial
from typing import Dict, List, Optional

import numpy as np
import oneflow as flow

from of_face.heads import streamed
from of_face.heads.partial_fc import HeadOutput
from of_face.oneflow_compat import optimizer_state
from of_face.train.optim import SparseAdamCorrection, clip_groups
from of_face.train.steps import TRAIN_STEP_VAR, StepOptions, StepParts, StepperState, named_parameters


class EagerStep:
    """The same step in eager OneFlow (its twin in tests; no AMP, no activation checkpointing)."""

    def __init__(self, parts: StepParts, options: StepOptions):
        if options.amp:
            raise NotImplementedError("AMP is available in graph mode only (Global.mode=graph)")
        if options.checkpointing:
            raise NotImplementedError("activation checkpointing is available in graph mode only (Global.mode=graph)")
        self.parts, self.options = parts, options
        self.correction = SparseAdamCorrection.of(parts.optimizer, parts.scheduler)
        self.steps_done = 0  # optimizer steps taken: picks the sampling noise (set on resume)
        self.plan = None
        if options.fc_chunks > 1:
            self.plan = streamed.ChunkPlan.of(parts.head, options.fc_chunks, embedding_grad=parts.trains_backbone)

    def __call__(self, images: flow.Tensor, labels: flow.Tensor) -> flow.Tensor:
        backbone, head, optimizer = self.parts.backbone, self.parts.head, self.parts.optimizer
        accum = self.options.accum_steps
        loss = 0.0
        micro = [self._micro_batches(images), self._micro_batches(labels), [None] * accum]
        if head.sampling:
            micro[2] = self._micro_batches(head.step_noise(self.steps_done, accum))
        self.steps_done += 1
        for x, y, noise in zip(*micro):
            if self.plan is not None:  # (no accumulation with chunks: they need sparse updates)
                out = self._streamed(backbone(x), y, noise)
            else:
                out = head.objective(backbone(x), y, noise)
                (out.objective / accum).backward()  # gradients add up to the mean over micro-batches
            loss = loss + out.loss.detach() / accum
        if getattr(head, "sparse_update", False):  # (no accumulation with it: one kept index)
            kept = head.sampled_mask(out.kept)  # [local, 1, 1]: rows of the weight table
            before = self._fc_state()
        clipped = clip_groups(optimizer)  # the graph clips inside its update: one norm, as here
        if clipped:
            params = [p for g in clipped for p in g.parameters if p.grad is not None]
            flow.nn.utils.clip_grad_norm_(params, clipped[0]["clip_grad_max_norm"], 2.0)
        optimizer.step()
        if getattr(head, "sparse_update", False):
            self._keep_unsampled_rows(kept, before)
        if self.correction is not None:  # the LR of this step: the scheduler steps below
            state = optimizer_state(optimizer)[head.weight]
            self.correction.apply(head.weight, state["exp_avg"], state["exp_avg_sq"], out.kept,
                                  self.correction.group["lr"], self.steps_done)
        optimizer.zero_grad()
        self.parts.scheduler.step()
        return loss

    def _streamed(self, emb: flow.Tensor, labels: flow.Tensor, noise: flow.Tensor) -> HeadOutput:
        """The head in chunks (heads/streamed.py), eagerly: the same passes as StreamStep's jobs;
        the backbone's backward runs from the embeddings' gradient, and each chunk's link adds
        its rows' gradient to the FC weight's (autograd through the rows' normalisation)."""
        head, plan = self.parts.head, self.plan
        with flow.no_grad():
            prep = streamed.prepare(head, plan, emb.detach(), labels, noise)
            offsets = streamed.chunk_offsets(plan, emb.placement)
            stats, lse, p_wn = streamed.all_chunk_stats(plan, prep, offsets, partial(streamed.chunk_stats, head, plan))
            loss, r, b, *d_emb = streamed.finish(head, prep, lse, p_wn, emb.detach())
        if d_emb and emb.requires_grad:
            emb.backward(d_emb[0])
        for c, off in enumerate(offsets):
            with flow.no_grad():
                g = streamed.chunk_row_grad(head, plan, stats[c][0], r[c], prep.xs, b, prep.slot, prep.owner, off)
            cut = slice(c * plan.size, (c + 1) * plan.size)
            streamed.row_grad_link(head, plan, g, prep.positions[cut], off).backward()
        return HeadOutput(loss, loss, prep.kept)

    def loss_scale(self) -> Optional[float]:
        return None  # no AMP in eager mode

    def state_dict(self) -> StepperState:
        """The optimizer's slots by parameter name, its step count (also saved as the graph's
        step counter, so the state resumes in graph mode) and the scheduler's state."""
        named = named_parameters(self.parts.backbone, self.parts.head)
        by_id = {id(p): n for n, p in named.items()}
        state = StepperState(step=self.steps_done, scheduler=self.parts.scheduler.state_dict())
        live = optimizer_state(self.parts.optimizer)
        for p, slots in live.items():
            if isinstance(p, str) or id(p) not in by_id or not isinstance(slots, dict):
                continue
            for slot, t in slots.items():
                if isinstance(t, flow.Tensor):
                    state.slots[(by_id[id(p)], slot)] = t
        state.variables[TRAIN_STEP_VAR] = np.array([int(live.get("step", 0))], np.int64)
        return state

    def load_state_dict(self, state: StepperState) -> None:
        """Before the first step: slots into the optimizer, then the LR schedule replayed for the
        saved optimizer step count (the same calls, so the same LR, as an unbroken run)."""
        named = named_parameters(self.parts.backbone, self.parts.head)
        live = optimizer_state(self.parts.optimizer)
        for (param, slot), t in state.slots.items():
            live.setdefault(named[param], {})[slot] = t
        count = state.variables.get(TRAIN_STEP_VAR)
        count = int(np.asarray(count).reshape(-1)[0]) if count is not None else int(state.step)
        live["step"] = count
        for _ in range(count):
            self.parts.scheduler.step()
        self.steps_done = int(state.step)

    def _micro_batches(self, t: flow.Tensor) -> List[flow.Tensor]:
        """Each rank's shard cut into accum_steps pieces, as the graph's gradient accumulation does."""
        if self.options.accum_steps == 1:
            return [t]
        pieces = flow.chunk(t.to_local(), self.options.accum_steps, dim=0)
        return [p.to_global(placement=t.placement, sbp=t.sbp) for p in pieces]

    def _fc_state(self) -> Dict[str, flow.Tensor]:
        """The FC weight and its optimizer state tensors (momentum / Adam moments), copied."""
        w = self.parts.head.weight
        state = optimizer_state(self.parts.optimizer).get(w, {})
        tensors = {k: v for k, v in state.items() if isinstance(v, flow.Tensor) and v.shape == w.shape}
        return {"weight": w.detach().clone(), **{k: v.clone() for k, v in tensors.items()}}

    def _keep_unsampled_rows(self, kept: flow.Tensor, before: Dict[str, flow.Tensor]) -> None:
        """Eager twin of the graph's sparse update: unsampled rows get back weight and state exactly."""
        w = self.parts.head.weight
        state = optimizer_state(self.parts.optimizer).setdefault(w, {})
        with flow.no_grad():
            w.copy_(flow.where(kept, w, before["weight"]))
            for k, old in before.items():
                if k != "weight":
                    state[k].copy_(flow.where(kept, state[k], old))
            for k, v in state.items():  # state created by this first step: unsampled rows start at 0
                if k not in before and isinstance(v, flow.Tensor) and v.shape == w.shape:
                    v.copy_(flow.where(kept, v, flow.zeros_like(v)))
