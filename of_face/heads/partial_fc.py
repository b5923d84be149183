"""The classification head: class-split FC, PartialFC sampling, combined margin, softmax CE.

The FC weight is one global tensor split along classes, so each rank stores and updates only its
own classes; embeddings are all-gathered, and the logits come out split along classes. It is
stored as a table [local, world, dim] split(1) (heads/fc_table.py): rank r's memory holds its classes
r*local + j, j < local. Softmax cross-entropy (heads/softmax.py) works on each rank's columns and
all-reduces only [batch] vectors.

PartialFC (sample_rate r < 1): every rank keeps k = ceil(r * local) of its centres per step, at
the same local positions J [k] on every rank: the positions of all positive classes of the global
batch (a class c sits at position c % local on rank c // local), filled with uniformly random
positions. Every positive is kept; every other kept centre is a uniformly random negative. J is
computed identically on every rank from the all-gathered labels and a host noise vector, so the
sampling itself moves no data. `index_select(weight, 0, J)` then reads [k, world, dim] split(1):
each rank gathers only its own rows, and nothing of the weight crosses ranks (only the features
[N, dim] are all-gathered, and [N] vectors all-reduced).

Sparse updates (`sparse_update=True`, with sampling): that index_select reads the weight variable
itself, so nn.Graph's indexed-slices pass (enabled by TrainGraph for `head.weight`) turns its
gradient plus the SGD momentum / AdamW update into `indexed_slices_*_update`: only kept rows and
their optimizer state change, and no full-size FC gradient is materialised. The pass refuses a
weight decay on the variable, so for SGD the decay of kept rows comes from a penalty
0.5*wd*|rows|^2 added to the objective (its gradient is exactly wd*w on kept rows and nothing
elsewhere); AdamW keeps its decoupled decay, which the sparse AdamW update applies to kept rows.

Lean: margin, softmax and cross-entropy run forward-only and yield the gradient with respect to
s * cos (heads/softmax.py); autograd sees only the cosine matmul and the normalisations. What
backward keeps: that gradient [N, C'] (an operand of the link product that hands it to
autograd), the matmul's inputs (scaled embeddings [N, D], normalised rows [world*k, D]) and what
the two normalisations need; nothing of the margin, the softmax or the one-hot mask.

The negatives' random scores come from the host (`step_noise`): a numpy generator seeded with
(seed, step) fills a [local] vector, the same on every rank, fed to the step as an input. Graph
and eager mode therefore sample the same centres, and a resumed run samples what the
uninterrupted one would have, with no in-graph random state to save. (Without it, `sample`
draws `flow.rand`.)

Classes are padded to a multiple of the world size; the padding classes are the last positions
of the last rank. Padded centres get a -1e4 logit bias, so their softmax probability underflows
to exactly 0: they never change the loss nor get a gradient, even when their position is kept
(as a real class's on the other ranks).
"""
import math
from typing import Any, Dict, NamedTuple, Optional, Sequence

import numpy as np
import oneflow as flow
import oneflow.nn as nn
import oneflow.nn.functional as F

from of_face import parallel
from of_face.oneflow_compat import functional
from of_face.heads import fc_table
from of_face.heads.fc_table import FCTable
from of_face.heads.margin import CombinedMargin, constant_like, label_columns, per_row, row_sum
from of_face.heads.softmax import attach_gradient, class_split_cross_entropy, softmax_cross_entropy

PAD_LOGIT = -1e4
__all__ = ["HeadOutput", "PartialFC", "class_split_cross_entropy"]


class Cosines(NamedTuple):
    """s * the head's cosines [N, C'] split(1) and what produced them (see `PartialFC.cosines`)."""
    cosine: Any
    labels: Any
    kept: Optional[Any]
    table: Any
    rows: Any
    xs: Any
    wn: Any


class HeadOutput(NamedTuple):
    """What one head call hands the step: what to differentiate (the loss plus the kept rows'
    decay penalty), the loss to report, and the kept positions ([k] broadcast, the same local
    positions on every rank; None without sampling), which eager mode's sparse update needs."""
    objective: Any
    loss: Any
    kept: Optional[Any] = None


def _num_sample(local_classes: int, sample_rate: float, global_batch: int) -> int:
    # Positives of one batch can never exceed the batch size, so a budget of at least
    # min(local_classes, global_batch) guarantees no positive is ever dropped.
    budget = math.ceil(sample_rate * local_classes)
    return min(local_classes, max(budget, global_batch))


class PartialFC(nn.Module):
    """Class-split FC + PartialFC + combined margin + softmax CE (see the module docstring).

    What it needs from the optimizer it states itself: `param_group()` (the FC group, with the
    options sparse updates need) and `sparse_variables` (parameter names, relative to the head,
    that the graph updates with indexed slices). `row_decay` is the weight decay of kept rows
    that sparse SGD applies through a penalty (see `heads.sparse_fc_options`).
    """

    def __init__(self, num_classes: int, embedding_size: int, margin: Sequence[float] = (1.0, 0.5, 0.0),
                 scale: float = 64.0, sample_rate: float = 1.0, device: str = "auto", init_std: float = 0.01,
                 global_batch: int = 0, sparse_update: bool = False, seed: int = 0, row_decay: float = 0.0,
                 group_options: Optional[Dict[str, Any]] = None, amp: bool = False):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.table = FCTable.of(num_classes)
        self.world = self.table.world
        self.padded_classes = self.table.padded
        self.local_classes = self.table.local
        self.sample_rate = sample_rate
        self.num_sample = _num_sample(self.local_classes, sample_rate, global_batch)
        self.sampling = self.num_sample < self.local_classes
        self.sparse_update = sparse_update and self.sampling
        self.row_decay = float(row_decay) if self.sparse_update else 0.0
        self.group_options = dict(group_options or {}) if self.sparse_update else {}
        self.device = device
        self.seed = seed
        self.outer = not amp  # [N] -> [N, C'] as outer products (margin.per_row): FP32 only
        self.weight = nn.Parameter(self.table.random(embedding_size, init_std, device))
        self.margin = CombinedMargin(*margin, scale=scale)
        pad = np.zeros((self.padded_classes, 1), np.float32)
        pad[num_classes:] = PAD_LOGIT
        self.pad_bias = self.table.from_rows(pad, device) if self.padded_classes > num_classes else None  # table

    @staticmethod
    def samples(num_classes: int, sample_rate: float, global_batch: int, world: Optional[int] = None) -> bool:
        """Whether a head of these settings samples (keeps fewer than all its local centres)."""
        local = FCTable.of(num_classes, world).local
        return _num_sample(local, sample_rate, global_batch) < local

    @property
    def sparse_variables(self) -> tuple:
        """Parameters (names relative to the head) whose gather + update the graph compiles to
        indexed-slices updates: only kept rows and their optimizer state change."""
        return ("weight",) if self.sparse_update else ()

    def param_group(self) -> Dict[str, Any]:
        """The optimizer group of the FC weight, with the options its update needs."""
        return {"params": [p for p in self.parameters() if p.requires_grad], **self.group_options}

    # ------------------------------------------------------------------ sampling
    def step_noise(self, step, micro_batches=1):
        """Uniform scores of the local positions at optimizer step `step`, the same [local] on
        every rank, as a [world * local] split(0) tensor. With gradient accumulation each
        micro-batch gets its own piece of each rank's shard (the graph cuts inputs per micro-batch)."""
        # Every rank draws the same values and hands in its own copy as its shard of a [world *
        # local] split(0) tensor (no data moves here); `sample` all-gathers it inside the step.
        # (A broadcast input would need an eager broadcast outside the compiled step each step;
        # measured: a 400-step 2-rank sampling loop then hung once in four runs.)
        rng = np.random.default_rng([self.seed, step])
        return fc_table.class_split(rng.random(micro_batches * self.local_classes, dtype=np.float32), self.device)

    def sample(self, labels, noise=None):
        """labels [N] broadcast -> (kept positions J [k] broadcast, remapped labels [N] broadcast).

        Position J[j] is kept on every rank: rank r keeps its class r*local + J[j] as logit column
        r*k + j, which is where a label c = r*local + p lands (p's slot j among J). Everything is
        computed identically on every rank (O(local + batch), local ops only).
        """
        local, k = self.local_classes, self.num_sample
        place = self.weight.placement
        rank_of = flow.floor_divide(labels, local)  # int64 all through: no class id merges
        position = labels - rank_of * local
        positive = self._marked(position)
        if noise is None:
            noise = flow.rand(local, placement=place, sbp=parallel.SBP_GATHERED)
        else:  # every rank's shard holds the same [local] scores (step_noise)
            noise = parallel.gather(noise).view(self.world, local)[0]
        _, kept = flow.topk(noise + 2.0 * positive, k)  # positives first (score >= 2 > noise)
        slots = flow.arange(k, dtype=flow.int64, placement=place, sbp=parallel.SBP_GATHERED)
        slot_of = functional.global_constant([local], 0, dtype=flow.int64, placement=place, sbp=parallel.SBP_GATHERED)
        slot_of = flow.scatter(slot_of, 0, kept, slots)
        return kept, rank_of * k + flow.index_select(slot_of, 0, position)

    @staticmethod
    def _kept(table, kept=None):
        """The kept positions of a table [local, world, ...] (all of it without sampling):
        [k, world, ...] split(1), each rank gathering its own rows (for the weight, an
        `index_select` that reads the variable itself, as the indexed-slices pass needs)."""
        return table if kept is None else flow.index_select(table, 0, kept)

    def kept_pad_bias(self, kept=None):
        """The -1e4 bias of padded classes among the kept columns, [world*k] split(0), or None."""
        if self.pad_bias is None:
            return None
        return fc_table.table_rows(self._kept(self.pad_bias, kept)).view(-1)

    def sampled_mask(self, kept):
        """[local, 1, 1] broadcast bool, True at the kept positions: selects, in the weight table
        [local, world, dim] (or its optimizer state), the rows a sparse update may change."""
        return self._marked(kept).view(self.local_classes, 1, 1).to(flow.bool)

    def _marked(self, positions):
        """[local] broadcast float: 1.0 at the given local positions, 0.0 elsewhere."""
        marks = functional.global_constant([self.local_classes], 0.0, dtype=flow.float32,
                                        placement=self.weight.placement, sbp=parallel.SBP_GATHERED)
        return flow.scatter(marks, 0, positions, constant_like(positions, 1.0, flow.float32))

    # ------------------------------------------------------------------ forward
    def cosines(self, embeddings, labels, noise=None, detach_rows=False):
        """embeddings [N, D] split(0) -> `Cosines`: s * cosines [N, world*k] split(1) (with
        autograd; the scale rides on the [N, D] side of the matmul, cheaper than on [N, C']),
        labels [N] broadcast as logit columns, kept positions [k] or None, the kept rows as a
        table [k, world, D] and as [world*k, D], and the scaled embeddings and normalised rows.
        `detach_rows`: no gradient reaches the FC weight."""
        embeddings = parallel.gather(embeddings, keep_grad_split=True)
        labels = parallel.gather(labels)
        kept = None
        if self.sampling:
            kept, labels = self.sample(labels, noise)
        table = self._kept(self.weight, kept)
        table = table.detach() if detach_rows else table
        rows = fc_table.table_rows(table)
        xs, wn = F.normalize(embeddings, dim=1) * self.margin.scale, F.normalize(rows, dim=1)
        cosine = flow.matmul(xs, wn, transpose_b=True)  # under AMP the matmul may run in FP16
        return Cosines(cosine.to(flow.float32), labels, kept, table, rows, xs, wn)

    def loss_and_grad(self, scaled, labels, kept=None):
        """Forward-only: (mean CE loss, d loss / d scaled) of s * cosines [N, C'] split(1) (no
        autograd), labels as logit columns. The margin changes only the label column, so the
        chain rule there is the margin's slope (`target_and_slope`) and 1 elsewhere."""
        s = self.margin.scale
        onehot = label_columns(scaled, labels)
        t = row_sum(scaled * onehot)  # [N] each row's s * target cosine, on every rank
        if self.margin.identity:
            target, slope, logits = t, None, scaled
        else:
            target, slope = self.margin.target_and_slope(t / s)  # (the margin's acos clamps to +-1)
            target = target * s
            logits = scaled + onehot * per_row(target - t, scaled, self.outer)
        pad = self.kept_pad_bias(kept)
        if pad is not None:  # (a label column is never a padded class: its bias there is 0)
            logits = logits + flow.broadcast_like(pad.unsqueeze(0), logits, broadcast_axes=[0])
        return softmax_cross_entropy(logits, onehot, target, label_slope=slope, outer=self.outer)

    def logits(self, embeddings, labels, noise=None):
        """embeddings [N, D] split(0) -> (logits [N, C'] split(1), labels [N] broadcast in C',
        kept positions [k] or None): the head's logits, for inspection (no autograd)."""
        c = self.cosines(embeddings, labels, noise)
        logits = self.margin((c.cosine.detach() / self.margin.scale).clamp(-1.0, 1.0), c.labels)
        pad = self.kept_pad_bias(c.kept)
        return (logits if pad is None else logits + pad), c.labels, c.kept

    def forward(self, embeddings, labels, noise=None):
        """Mean softmax cross-entropy over the global batch (a scalar global tensor)."""
        return self.objective(embeddings, labels, noise).loss

    def objective(self, embeddings, labels, noise=None) -> HeadOutput:
        """The loss, what to differentiate (the loss, plus the kept rows' decay penalty, whose
        gradient autograd takes through the cosine matmul) and the kept positions."""
        c = self.cosines(embeddings, labels, noise)
        loss, grad = self.loss_and_grad(c.cosine.detach(), c.labels, c.kept)
        loss = attach_gradient(loss, c.cosine, grad)  # the same value, differentiable
        objective = loss
        if self.row_decay:  # d/d table = row_decay * table: SGD's decay of the kept rows only
            objective = objective + self.row_decay * (c.table * c.table.detach()).sum()
        return HeadOutput(objective, loss, c.kept)

    def objective_and_row_grad(self, embeddings, labels, noise=None):
        """(HeadOutput whose objective reaches only the backbone, the kept rows' gradient as a
        table [k, world, D] split(1)): for AMP + sparse updates (train/amp_sparse.py), where the
        FC update runs outside the loss-scaled graph. The rows' gradient is computed in the
        forward, unscaled: d loss / d wn = grad^T xn through the normalisation (the same maths
        autograd runs in `objective`). Under AMP that matmul runs in FP16, so grad is first
        brought to a maximum of 2^6 by a power of two (exact; its small entries stay clear of
        FP16's subnormals as a loss-scaled backward's would) and the product scaled back in FP32."""
        c = self.cosines(embeddings, labels, noise, detach_rows=True)
        loss, grad = self.loss_and_grad(c.cosine.detach(), c.labels, c.kept)
        loss = attach_gradient(loss, c.cosine, grad)
        peak = parallel.gather(flow.abs(grad).max()).clamp(min=1e-30)  # (max over every rank's columns)
        scale = flow.pow(constant_like(peak, 2.0), 6.0 - flow.floor(flow.log2(peak)))
        g_wn = flow.matmul(grad * scale, c.xs.detach(), transpose_a=True).to(flow.float32) / scale
        wn, norm = c.wn.detach(), flow.sqrt((c.rows * c.rows).sum(dim=1)).clamp(min=1e-12)
        g_rows = (g_wn - wn * per_row((wn * g_wn).sum(dim=1), wn)) / per_row(norm, wn)
        if self.row_decay:
            g_rows = g_rows + self.row_decay * c.rows
        return HeadOutput(loss, loss, c.kept), fc_table.rows_table(g_rows, self.world)
