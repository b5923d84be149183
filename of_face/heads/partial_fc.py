"""The classification head: class-split FC, PartialFC sampling, combined margin, softmax CE.

The FC weight [classes, dim] is one global tensor split along classes, so each rank stores and
updates only its slice; embeddings are all-gathered, and the logits come out split along classes.
Softmax cross-entropy over the class-split logits (`class_split_cross_entropy`, at the end) works
on each rank's columns and all-reduces only [batch] vectors.

PartialFC (sample_rate r < 1): every rank keeps k = ceil(r * local_classes) of its centres per
step: all positive classes of the global batch, filled with uniformly random negatives. It is
built from ops with CPU and GPU kernels (OneFlow's `distributed_partial_fc_sample` has no CPU
kernel): the class scores are viewed as [world, local_classes] split(0), so top-k and the gather
of the kept centres run locally on each rank. Labels are remapped through a [classes] position
map looked up with the labels (O(batch + classes), no [batch, sampled] comparison matrix).

Sparse updates (`sparse_update=True`, with sampling): the kept rows are read with one
`index_select` of the weight variable by global class id. nn.Graph's indexed-slices pass
(enabled by TrainGraph for `head.weight`) then turns that gather's gradient plus the SGD
momentum / AdamW update into `indexed_slices_*_update`: only kept rows and their optimizer state
change, and no full-size FC gradient is materialised. That pass refuses a weight decay on the
variable, so for SGD the decay of kept rows comes from a penalty 0.5*wd*|rows|^2 added to the
objective (its gradient is exactly wd*w on kept rows and nothing elsewhere); AdamW keeps its
decoupled decay, which the sparse AdamW update applies to the kept rows. The gather of a split
weight with broadcast ids yields partial sums, so the kept rows cost one reduce-scatter forward
and one all-gather of their gradient backward (world*k*dim values each).

The negatives' random scores come from the host (`step_noise`): a numpy generator seeded with
(seed, step, rank) fills this rank's shard and is fed to the step as an input. Graph and eager
mode therefore sample the same centres, and a resumed run samples what the uninterrupted one
would have, with no in-graph random state to save. (Without it, `sample` draws `flow.rand`.)

Classes are padded to a multiple of the world size. Padded centres get a -1e4 logit bias, so
their softmax probability underflows to exactly 0: they never change the loss nor get a
gradient. Sampling ranks them last, so they are kept only on a rank with fewer real classes
than its budget, and then still carry the bias.
"""
import math
from typing import Any, Dict, NamedTuple, Optional, Sequence

import numpy as np
import oneflow as flow
import oneflow.nn as nn
import oneflow.nn.functional as F

from of_face import parallel
from of_face.heads.margin import CombinedMargin, constant_like, label_columns, per_row, row_max, row_sum

PAD_LOGIT = -1e4


class HeadOutput(NamedTuple):
    """What one head call hands the step: what to differentiate (the loss plus the kept rows'
    decay penalty), the loss to report, and the kept centres ([world, k] local ids per rank;
    None without sampling), which eager mode's sparse update needs."""
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
                 group_options: Optional[Dict[str, Any]] = None):
        super().__init__()
        self.num_classes = num_classes
        self.world = parallel.world_size()
        self.padded_classes = parallel.padded_classes(num_classes)
        self.local_classes = self.padded_classes // self.world
        self.sample_rate = sample_rate
        self.num_sample = _num_sample(self.local_classes, sample_rate, global_batch)
        self.sampling = self.num_sample < self.local_classes
        self.sparse_update = sparse_update and self.sampling
        self.row_decay = float(row_decay) if self.sparse_update else 0.0
        self.group_options = dict(group_options or {}) if self.sparse_update else {}
        self.device = device
        self.seed = seed
        self.weight = nn.Parameter(
            parallel.fc_weight_random(self.padded_classes, embedding_size, init_std, device)
        )
        self.margin = CombinedMargin(*margin, scale=scale)
        pad = np.zeros(self.padded_classes, np.float32)
        pad[num_classes:] = PAD_LOGIT
        self.pad_bias = parallel.fc_weight(pad, device) if self.padded_classes > num_classes else None

    @staticmethod
    def samples(num_classes: int, sample_rate: float, global_batch: int, world: Optional[int] = None) -> bool:
        """Whether a head of these settings samples (keeps fewer than all its local centres)."""
        local = parallel.padded_classes(num_classes, world) // (world or parallel.world_size())
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
        """Uniform scores for this rank's classes at optimizer step `step`: global [C'] split(0).

        With gradient accumulation each micro-batch gets its own row: [micro_batches * C'] laid
        out per rank, so the graph's accumulation (which cuts each rank's shard) hands one to each.
        """
        rng = np.random.default_rng([self.seed, step, parallel.rank()])
        local = rng.random(micro_batches * self.local_classes, dtype=np.float32)
        return parallel.fc_shard(local, self.device)

    def sample(self, labels, noise=None):
        """labels [N] broadcast -> (kept index per rank [world, k] split(0), remapped labels [N] broadcast).

        Kept index j on rank r is local class idx[r, j], i.e. global class r*local + idx[r, j];
        the remapped label of a sample is its true centre's position among the world*k kept ones.
        """
        world, local, k = self.world, self.local_classes, self.num_sample
        place = self.weight.placement
        positive = flow.zeros(self.padded_classes, placement=place, sbp=parallel.SBP_GATHERED)
        positive = flow.scatter(positive, 0, labels, constant_like(labels, 1.0, flow.float32))
        if noise is None:
            noise = flow.rand(self.padded_classes, placement=place, sbp=parallel.SBP_FC_WEIGHT)
        score = noise + 2.0 * positive.to_global(sbp=parallel.SBP_FC_WEIGHT)  # positives first
        if self.pad_bias is not None:
            score = score + self.pad_bias  # padded classes rank last
        _, index = flow.topk(score.view(world, local), k, dim=1)  # [world, k], local per rank
        # position map: slot j for each kept local class, looked up by the labels
        rank_of = flow.floor_divide(labels, local)
        slots = flow.arange(k, placement=place, sbp=parallel.SBP_GATHERED).unsqueeze(0).expand(world, k)
        slots = slots.to_global(sbp=parallel.SBP_FC_WEIGHT).to(flow.float32)
        position = flow.zeros(world, local, placement=place, sbp=parallel.SBP_FC_WEIGHT)
        position = flow.scatter(position, 1, index, slots).view(self.padded_classes)
        slot = flow.index_select(position, 0, labels)  # other ranks contribute 0: a partial sum
        slot = parallel.gather(slot).to(flow.int64)
        return index, rank_of * k + slot

    def sampled_weight(self, index):
        """Rows of the weight kept on each rank: [world*k, dim] split(0), gathered locally."""
        world, k = self.world, self.num_sample
        dim = self.weight.shape[1]
        w = self.weight.view(world, self.local_classes, dim)
        rows = flow.gather(w, 1, index.unsqueeze(-1).expand(world, k, dim))
        return rows.view(world * k, dim)

    def sparse_rows(self, index):
        """The same rows as `sampled_weight`, read with index_select by global class id.

        This form (a gather whose input is the variable itself) is what nn.Graph's indexed-slices
        optimizer pass recognises; ids must be broadcast, so the output is a partial sum that a
        reduce-scatter turns back into each rank's own rows.
        """
        world, local, k = self.world, self.local_classes, self.num_sample
        offset = flow.arange(world, placement=self.weight.placement, sbp=parallel.SBP_GATHERED) * local
        ids = index + offset.to_global(sbp=parallel.SBP_FC_WEIGHT).unsqueeze(1)  # [world, k] global ids
        rows = flow.index_select(self.weight, 0, parallel.gather(ids.view(world * k)))
        return rows.to_global(sbp=parallel.SBP_FC_WEIGHT)

    def sampled_mask(self, index):
        """[padded classes] split(0): 1 for the centres kept at `index`, else 0."""
        mask = flow.zeros(self.world, self.local_classes, placement=self.weight.placement, sbp=parallel.SBP_FC_WEIGHT)
        return flow.scatter(mask, 1, index, constant_like(index, 1.0, flow.float32)).view(self.padded_classes)

    def sampled_pad_bias(self, index):
        """The -1e4 bias of padded classes, for the kept ones (only when a rank has too few real ones)."""
        if self.pad_bias is None:
            return None
        return flow.gather(self.pad_bias.view(self.world, self.local_classes), 1, index).view(-1)

    # ------------------------------------------------------------------ forward
    def logits(self, embeddings, labels, noise=None):
        """embeddings [N, D] split(0) -> (logits [N, C'] split(1), labels [N] broadcast in C',
        kept index [world, k] or None, the kept rows' decay penalty or None)."""
        embeddings = parallel.gather(embeddings, keep_grad_split=True)
        labels = parallel.gather(labels)
        pad_bias, index, penalty = self.pad_bias, None, None
        if self.sampling:
            index, labels = self.sample(labels, noise)
            weight = self.sparse_rows(index) if self.sparse_update else self.sampled_weight(index)
            pad_bias = self.sampled_pad_bias(index)
            if self.row_decay:
                penalty = 0.5 * self.row_decay * (weight * weight).sum()
        else:
            weight = self.weight
        cosine = flow.matmul(F.normalize(embeddings, dim=1), F.normalize(weight, dim=1), transpose_b=True)
        cosine = cosine.to(flow.float32)  # under AMP the matmul may run in FP16; margin, logits, loss stay FP32
        logits = self.margin(cosine.clamp(-1.0, 1.0), labels)
        if pad_bias is not None:
            logits = logits + pad_bias
        return logits, labels, index, penalty

    def forward(self, embeddings, labels, noise=None):
        """Mean softmax cross-entropy over the global batch (a scalar global tensor)."""
        return self.objective(embeddings, labels, noise).loss

    def objective(self, embeddings, labels, noise=None) -> HeadOutput:
        """The loss, what to differentiate (loss + the kept rows' decay penalty) and the kept index."""
        logits, labels, index, penalty = self.logits(embeddings, labels, noise)
        loss = class_split_cross_entropy(logits, labels)
        return HeadOutput(loss if penalty is None else loss + penalty, loss, index)


def class_split_cross_entropy(logits, labels):
    """Mean softmax cross-entropy of logits [N, C] split along C, labels [N] broadcast.

    Every op is local to the rank's columns except all-reduces of [N] vectors (OneFlow's
    `sparse_softmax_cross_entropy` on split(1) logits spends most of a CPU step in its row-max
    machinery: docs/BENCHMARKS.md, P2). Log-sum-exp is shifted by the exact row max (`row_max`:
    each rank's max over its own columns, then a max over the [world, N] maxima), detached: every
    exp(z - max) is in (0, 1] and the largest is 1, so the sum neither overflows (it is at most
    C) nor underflows, at any class count and any scale whose logits fp32 can hold.
    """
    # 1.0 in each row's label column, on the rank that owns it
    onehot = label_columns(logits, labels)
    target = row_sum(logits * onehot)  # [N] each row's target logit, on every rank
    shift = row_max(logits.detach())
    lse = flow.log(row_sum(flow.exp(logits - per_row(shift, logits)))) + shift
    return (lse - target).mean()
