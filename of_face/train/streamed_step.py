"""The compiled steps of the streamed FC head: K class chunks (`Loss.fc_chunks` > 1), or one.

heads/streamed.py has the maths; here are the compiled jobs and their order. Each job is
compiled once and called every step (the chunk jobs K times), so its CPU buffers are sized by
one chunk and reused by every call:

    ForwardGraph   images -> embeddings                     (backbone, forward only)
    PrepareGraph   sampling, scaled embeddings, labels' target logits
    StatsGraph     x K: one chunk's softmax, log-sum-exp and p @ wn
    FinishGraph    loss, chunk row weights, d loss / d embeddings
    BackboneGraph  images, d embeddings -> the backbone's update (forward recomputed)

then, on the host, per chunk: its rows' d loss / d wn from the chunk's p (heads/streamed.py,
`rows_grad`) and the update of those rows and their optimizer state in the rank's own shard
(train/fc_rows.py).

What the split costs: the backbone's forward runs twice (its activations cannot live from one
job to the next); BatchNorm's running statistics are updated by the first forward only (the
recomputed one is traced with momentum 0; its `num_batches_tracked` counts both, which nothing
reads at a fixed momentum). The FC's optimizer (train/fc_rows.py) takes the LR schedule's value
at the optimizer step and sparse AdamW's bias correction at the FC updates made, so both count
optimizer steps, not chunk calls. Under AMP the
two backbone jobs run FP16 with the dynamic loss scale in BackboneGraph, the head runs FP32, and
the FC is updated only when the backbone's step was kept (as train/amp_sparse.py).

K = 1 on the CPU in FP32 (OneJobStep, picked by train/system.py for sparse FC updates): the same
passes over one chunk need no second pass, so the backbone's forward, PrepareGraph's, StatsGraph's
and FinishGraph's work and the backbone's backward are ONE job (OneJobGraph), nothing recomputed,
and the host updates the rows as above. Against TrainGraph's autograd head it makes fewer [N, k]
passes (softmax, not exp; the label column's logit from its own row) and its rows' gradient runs
in numpy's BLAS: 2.2-2.7x faster and a third smaller at 1M classes (docs/BENCHMARKS.md P2g).
"""
from dataclasses import replace
from functools import partial
from typing import List, Optional, Tuple

import oneflow as flow
import oneflow.nn as nn

from of_face import parallel
from of_face.heads import streamed
from of_face.heads.streamed import ChunkPlan, Prepared
from of_face.oneflow_compat import sync
from of_face.train.amp_sparse import AmpSparseStep, split_optimizer
from of_face.train.fc_rows import RowOptimizer
from of_face.train.steps import StepOptions, StepParts, StepperState, TrainGraph


class _HeadGraph(nn.Graph):
    """A head job: the head's variables, no optimizer; `builds` counts compilations."""

    def __init__(self, head: nn.Module, plan: ChunkPlan):
        super().__init__()
        self.head, self.plan, self.builds = head, plan, 0


class PrepareGraph(_HeadGraph):
    def build(self, embeddings, labels, noise):
        self.builds += 1
        return tuple(v for v in streamed.prepare(self.head, self.plan, embeddings, labels, noise) if v is not None)


class StatsGraph(_HeadGraph):
    def build(self, xs, positions, slot, owner, offset, col_bias=None):
        self.builds += 1
        return streamed.chunk_stats(self.head, self.plan, xs, positions, slot, owner, offset, col_bias)


class FinishGraph(_HeadGraph):
    def build(self, lse, xs, target, slope, label_rows, embeddings, p_wn=None):
        self.builds += 1
        prepared = Prepared(xs, None, None, None, None, None, target, slope, label_rows)
        return streamed.finish(self.head, prepared, lse, p_wn, embeddings)


class ForwardGraph(nn.Graph):
    """The backbone's forward: the embeddings the head streams over (float32)."""

    def __init__(self, backbone: nn.Module, amp: bool):
        super().__init__()
        self.backbone, self.builds = backbone, 0
        if amp:
            self.config.enable_amp(True)

    def build(self, images):
        self.builds += 1
        return self.backbone(images).to(flow.float32)


def _batchnorms(module: nn.Module) -> List[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class BackboneGraph(TrainGraph):
    """The backbone's update from the embeddings' gradient: the forward recomputed (BatchNorm's
    running statistics left alone: ForwardGraph updated them), then backward of <emb, d emb>."""

    def __init__(self, parts: StepParts, options: StepOptions):
        super().__init__(parts, options)
        # the modules themselves, not nn.Graph's proxies of them (a Module attribute of a graph
        # is proxied, and its momentum would be set on the proxy, which the trace does not read)
        self._norms, self.builds = tuple(_batchnorms(parts.backbone)), 0

    def build(self, images, d_embeddings):
        self.builds += 1
        norms = self._norms
        saved = [m.momentum for m in norms]
        for m in norms:  # traced once: this job's BatchNorms use batch statistics and update nothing
            m.momentum = 0.0
        try:
            emb = self.backbone(images).to(flow.float32)
        finally:
            for m, value in zip(norms, saved):
                m.momentum = value
        link = (emb * d_embeddings).sum()
        link.backward()
        return link


class StreamStep(AmpSparseStep):
    """The step for K > 1 chunks (see the module docstring); from AmpSparseStep it takes the FC's
    own job: its update count, the loss scaler's skip decision and the state it saves."""

    def __init__(self, parts: StepParts, options: StepOptions):
        if options.accum_steps > 1:
            raise ValueError("Loss.fc_chunks > 1 does not combine with Optimizer.accum_steps > 1")
        self.plan = ChunkPlan.of(parts.head, options.fc_chunks, embedding_grad=parts.trains_backbone)
        super().__init__(parts, options)

    def _jobs(self) -> Tuple[Optional[TrainGraph], RowOptimizer, None]:
        parts, plan = self.parts, self.plan
        (opt1, sch1), _ = split_optimizer(parts.optimizer, parts.scheduler, parts.head)
        self.prepare_graph = PrepareGraph(parts.head, plan)
        self.stats_graph = StatsGraph(parts.head, plan)
        self.finish_graph = FinishGraph(parts.head, plan)
        self.forward_graph, graph = None, None
        if opt1 is not None:  # (an identity backbone, as the FC benches use, has nothing to run)
            self.forward_graph = ForwardGraph(parts.backbone, self.options.amp)
            graph = BackboneGraph(replace(parts, optimizer=opt1, scheduler=sch1), self.options)
        self._offsets = streamed.chunk_offsets(plan, self.placement)
        # the FC's optimizer, in place of AmpSparseStep's FC job (its slots are the state saved);
        # its bias correction is its own (no SparseAdamCorrection)
        return graph, RowOptimizer(parts.head, parts.optimizer, parts.scheduler), None

    @property
    def graphs(self) -> List[nn.Graph]:
        return [g for g in (self.forward_graph, self.prepare_graph, self.stats_graph, self.finish_graph,
                            self.graph) if g is not None]

    def __call__(self, images: flow.Tensor, labels: flow.Tensor) -> flow.Tensor:
        step = self.steps_done
        loss, r, b, chunks, prep = self._passes(images, labels, step)
        self.steps_done += 1
        if not self._scaler_kept(loss):
            return loss  # AMP skipped the backbone's step on every rank: so does the FC
        sync()  # every queued write to the FC (a resumed or copied-in weight) is done
        # broadcast tensors (the same on every rank) and this rank's blocks, as numpy
        positions, xs, b, slot, owner = (t.to_local().numpy() for t in (prep.positions, prep.xs, b, prep.slot,
                                                                       prep.owner))
        weights, rank, plan = r.to_local().numpy(), parallel.rank(), self.plan  # [K, 1, N]
        for c, p in enumerate(chunks):
            start = c * plan.size
            g = streamed.rows_grad(p.to_local().numpy()[0], weights[c, 0], xs, b, slot, owner, start, rank)
            real = min(plan.size, plan.kept - start)  # (the last chunk's padding left out)
            self.fc_job.apply(positions[start:start + real], g[:real], step, self.fc_updates + 1)
        self._fc_updated(prep.kept, step)
        return loss

    def _passes(self, images: flow.Tensor, labels: flow.Tensor, step: int) -> tuple:
        """The jobs of one step -> (loss, r [K, world, N] split(1), b [N], each chunk's p, Prepared)."""
        head, plan = self.parts.head, self.plan
        emb = self.forward_graph(images) if self.forward_graph is not None else images
        out = list(self.prepare_graph(emb, labels, head.step_noise(step)))
        if not plan.col_bias:
            out.insert(3, None)
        prep = Prepared(*out)
        stats, lse, p_wn = streamed.all_chunk_stats(plan, prep, self._offsets, self.stats_graph)
        extra = [p_wn] if p_wn is not None else []
        loss, r, b, *d_emb = self.finish_graph(lse, prep.xs, prep.target, prep.slope, prep.label_rows, emb, *extra)
        if self.graph is not None:
            self.graph(images, d_emb[0])
        return loss, r, b, [s[0] for s in stats], prep

    def _scaler_kept(self, loss: flow.Tensor) -> bool:
        """Without AMP (or a backbone) always; under AMP, AmpSparseStep's answer."""
        return not self.options.amp or self.graph is None or super()._scaler_kept(loss)

    def _updates_missing(self, state: StepperState) -> int:
        return self.steps_done  # a single-job stepper's: one FC update per optimizer step

    def loss_scale(self) -> Optional[float]:
        return super().loss_scale() if self.graph is not None else None


class OneJobGraph(TrainGraph):
    """K = 1: the backbone, the head's passes over one chunk and the backbone's backward, one job."""

    def __init__(self, parts: StepParts, options: StepOptions, plan: ChunkPlan):
        super().__init__(parts, options)
        self.plan, self.builds = plan, 0

    def build(self, images, labels, noise, offset):
        self.builds += 1
        head, plan = self.head, self.plan
        emb = self.backbone(images).to(flow.float32)
        x = emb.detach()  # the head's passes hand the backbone its gradient through the link below
        prep = streamed.prepare(head, plan, x, labels, noise)
        # the one chunk loop of eager mode and StreamStep, here over one chunk traced into this job
        stats, lse, p_wn = streamed.all_chunk_stats(plan, prep, [offset], partial(streamed.chunk_stats, head, plan))
        loss, r, b, *d_emb = streamed.finish(head, prep, lse, p_wn, x)
        if self.trains:  # (d emb detached: it is made from the FC weight, whose gradient nothing here wants)
            (emb * d_emb[0].detach()).sum().backward()
        return loss, r, b, stats[0][0], prep.xs, prep.kept, prep.slot, prep.owner


class OneJobStep(StreamStep):
    """The streamed head at K = 1 on CPU (FP32, sparse updates): the backbone's forward, the head's
    passes as one chunk and the backbone's backward are one compiled job, so nothing is recomputed;
    the FC's rows are updated on the host as at K > 1 (see the module docstring)."""

    def _jobs(self) -> Tuple[Optional[TrainGraph], RowOptimizer, None]:
        parts = self.parts
        (opt1, sch1), _ = split_optimizer(parts.optimizer, parts.scheduler, parts.head)
        self.one_graph = OneJobGraph(replace(parts, optimizer=opt1, scheduler=sch1), self.options, self.plan)
        self._offsets = streamed.chunk_offsets(self.plan, self.placement)
        return self.one_graph, RowOptimizer(parts.head, parts.optimizer, parts.scheduler), None

    @property
    def graphs(self) -> List[nn.Graph]:
        return [self.one_graph]

    def _passes(self, images: flow.Tensor, labels: flow.Tensor, step: int) -> tuple:
        noise = self.parts.head.step_noise(step)
        loss, r, b, p, xs, kept, slot, owner = self.graph(images, labels, noise, self._offsets[0])
        prep = Prepared(xs, kept, kept, None, slot, owner, None, None, None)  # (one chunk: positions = kept)
        return loss, r, b, [p], prep
