"""The PartialFC head streamed in class chunks (`Loss.fc_chunks` = K > 1).

A compiled OneFlow job gives every CPU tensor its own buffer for the whole run, so the head's
peak grows with every [N, C'] and [k, dim] tensor it makes (docs/BENCHMARKS.md). Streamed, each
rank's k kept columns go through the head in K chunks of k_c = ceil(k / K) columns, and one
compiled job per pass is called once per chunk: its buffers are sized by one chunk and serve
them all. The loss is exact over all chunks and ranks:

1. `prepare` (once per step): sampling (heads/partial_fc.py), the scaled embeddings xs [N, D],
   and each row's label: its raw scaled cosine t read from the label's own weight row (an [N, D]
   gather, not a column of the chunks), the margin's target logit and slope, its normalised row.
2. `chunk_stats` (per chunk): the chunk's logits z [world, N, k_c], rank-major (split(0): each
   rank's own block, so every per-row operation below is local), with the label columns pushed
   to -1e4 (the label enters through its target logit alone) and padding columns too. Softmax
   over the chunk's columns (OneFlow's CPU softmax runs about 4x faster than its exp), the
   chunk's log-sum-exp per rank (lse = max - log max p: the largest p is 1 / sum), and
   p @ wn [world, N, D], the chunk's share of the embeddings' gradient before its row weights.
3. `finish` (once per step): LSE = log(sum over chunks and ranks of exp(lse) + exp(target)),
   the loss mean(LSE - target), each chunk's row weight r = exp(lse - LSE) / N (so that the
   gradient of the chunk's columns is r * p), the label column's gradient b = (p_t - 1) * slope
   / N, and the embeddings' gradient sum(r * (p @ wn)) + b * label row, through the normalisation.
4. `rows_grad` (per chunk, on the host): g = d loss / d wn of the chunk's normalised rows, one
   matmul (r p + b at each row's label column)^T xs (`chunk_row_grad` is its OneFlow form, which
   eager mode runs). The rows' own gradient goes through the
   normalisation (`rows_gradient`, g / |w| - w <w, g> / |w|^3, plus sparse SGD's penalty on the
   kept rows) where the rows are updated: on the host, in each rank's own shard (train/fc_rows.py),
   so only the chunk's rows and their optimizer state change. Eager mode takes the same g through
   autograd instead (`row_grad_link`).

Only [N]-sized vectors and [N, D] matrices cross ranks. The chunks' p are kept between passes
(one [N, k] float32 per rank, the size of ONE logits tensor of the single compiled step), so the
cosine matmul runs once: the matmuls are those of K = 1 (p @ wn only when a backbone trains from
the embeddings' gradient; with nothing upstream, as the FC benches' identity backbone, it is
skipped, as autograd skips it at K = 1). The last chunk is padded with its own first position (a
duplicate within one chunk, whose column gets the -1e4 bias: p = 0 there, so its g row is 0; the
update leaves the padding out).
"""
import math
from typing import Any, NamedTuple, Optional

import numpy as np
import oneflow as flow
import oneflow.nn.functional as F

from of_face import parallel
from of_face.heads.margin import constant_like
from of_face.oneflow_compat import functional
from of_face.heads.partial_fc import PAD_LOGIT, PartialFC

NORM_EPS = 1e-12  # F.normalize's


class ChunkPlan(NamedTuple):
    """How a step's kept columns are cut: `chunks` calls of `size` columns per rank."""
    kept: int  # k, kept columns per rank
    chunks: int  # chunks run (ceil(k / size) <= the K asked for)
    size: int  # k_c, columns per rank per chunk
    col_bias: bool  # padded classes or padding columns exist: the chunks get a column bias
    embedding_grad: bool = True  # d loss / d embeddings is needed (a backbone trains from it)

    @property
    def padded(self) -> int:
        return self.chunks * self.size

    @classmethod
    def of(cls, head: PartialFC, chunks: int, embedding_grad: bool = True) -> "ChunkPlan":
        """`embedding_grad` False (nothing upstream trains, e.g. the FC benches' identity
        backbone): the chunks skip p @ wn, as autograd skips it in the single compiled step."""
        k = head.num_sample
        size = math.ceil(k / max(1, chunks))
        run = math.ceil(k / size)
        return cls(k, run, size, head.pad_bias is not None or run * size != k, embedding_grad)


class Prepared(NamedTuple):
    """What every chunk of a step shares (all broadcast unless said)."""
    xs: Any  # [N, D] s * normalised embeddings (all ranks' rows)
    kept: Any  # [k] kept local positions
    positions: Any  # [chunks * size] kept positions, the last chunk padded
    col_bias: Optional[Any]  # [world, chunks * size] split(0): -1e4 at padded classes / padding columns
    slot: Any  # [N] int64 each row's label as a kept slot (< k)
    owner: Any  # [N] int64 the rank owning each row's label
    target: Any  # [N] s * the margin's target logit
    slope: Any  # [N] d target / d t (1 without a margin)
    label_rows: Any  # [N, D] each row's normalised label row


def prepare(head: PartialFC, plan: ChunkPlan, embeddings, labels, noise) -> Prepared:
    """Sampling and everything per row (see the module docstring, 1)."""
    x = parallel.gather(embeddings)
    y = parallel.gather(labels)
    kept, columns = head.sample(y, noise)
    k, local, s = plan.kept, head.local_classes, head.margin.scale
    owner = flow.floor_divide(columns, k)
    slot = columns - owner * k
    xs = F.normalize(x, dim=1) * s
    # each rank reads row (label - owner * local) of its own shard; only the owner's counts
    own = parallel.own_split(F.one_hot(owner, head.world).to(flow.float32), 1)  # [N, world] split(1)
    rows = flow.index_select(head.weight, 0, y - owner * local)  # [N, world, D] split(1)
    wn = F.normalize(rows, dim=2)
    t = parallel.gather(((wn * xs.unsqueeze(1)).sum(dim=2) * own).sum(dim=1))
    label_rows = parallel.gather((wn * own.unsqueeze(2)).sum(dim=1))
    if head.margin.identity:
        target, slope = t, constant_like(t, 1.0)
    else:
        target, slope = head.margin.target_and_slope(t / s)
        target = target * s
    positions = kept
    if plan.padded > k:
        positions = flow.cat([kept, kept[(plan.chunks - 1) * plan.size:][:1].repeat(plan.padded - k)])
    bias = None
    if plan.col_bias:
        index = flow.arange(plan.padded, dtype=flow.int64, placement=kept.placement, sbp=parallel.SBP_GATHERED)
        bias = (index >= k).to(flow.float32) * PAD_LOGIT  # [padded] broadcast
        bias = parallel.per_rank(bias)  # [world, padded] split(0)
        if head.pad_bias is not None:
            pad = flow.index_select(head.pad_bias, 0, positions)  # [padded, world, 1] split(1)
            bias = bias + flow.transpose(pad, 0, 1).reshape(head.world, plan.padded)
    return Prepared(xs, kept, positions, bias, slot, owner, target, slope, label_rows)


def _label_marks(plan: ChunkPlan, world: int, slot, owner, offset):
    """([world, N] float 1.0 where rank r holds row i's label column in this chunk, its
    position in the chunk (0 elsewhere)), split(0): each rank its own row of marks."""
    at = slot - offset
    inside = flow.logical_and(at >= 0, at < plan.size)
    own = F.one_hot(owner, world).to(flow.float32).transpose(0, 1)  # [world, N]
    marks = parallel.own_split(own * inside.to(flow.float32).unsqueeze(0), 0)
    where = parallel.per_rank(at.clamp(0, plan.size - 1) * inside.to(flow.int64))
    return marks, where


def _rows(v, like):
    """v [..., M] repeated along the last axis of like [..., M, D], as the outer product with a
    ones row (an exact K = 1 matmul): OneFlow 0.9's CPU kernels broadcast a trailing 1 element by
    element, and broadcast_like is 15x slower than this product (docs/BENCHMARKS.md)."""
    shape = tuple(like.shape[:-2]) + (1, like.shape[-1])
    ones = functional.global_constant(shape, 1.0, dtype=like.dtype, placement=like.placement, sbp=like.sbp)
    return flow.matmul(v.unsqueeze(-1).to(like.dtype), ones)


def _chunk_rows(head: PartialFC, positions):
    """The chunk's rows [world, k_c, D] split(0) (an index_select that reads the variable) and
    their normalisation."""
    rows = flow.transpose(flow.index_select(head.weight, 0, positions), 0, 1)
    return rows, F.normalize(rows, dim=2)


def chunk_stats(head: PartialFC, plan: ChunkPlan, xs, positions, slot, owner, offset, col_bias=None):
    """One chunk (module docstring, 2) -> (p [world, N, k_c], lse [world, N], p @ wn [world, N, D]
    if the plan needs the embeddings' gradient), all split(0). `positions` [k_c] and `col_bias`
    [world, k_c] are the chunk's; `offset` [1] its first slot."""
    _, wn = _chunk_rows(head, positions)
    z = flow.matmul(parallel.per_rank(xs), wn, transpose_b=True)  # [world, N, k_c]
    if col_bias is not None:
        z = z + col_bias.unsqueeze(1)
    marks, where = _label_marks(plan, head.world, slot, owner, offset)
    z = flow.scatter_add(z, 2, where.unsqueeze(2), (marks * PAD_LOGIT).unsqueeze(2))
    top = flow.amax(z, dim=2)
    p = flow.softmax(z, dim=2)
    lse = top - flow.log(flow.amax(p, dim=2))
    return (p, lse, flow.matmul(p, wn)) if plan.embedding_grad else (p, lse)


def chunk_offsets(plan: ChunkPlan, placement) -> list:
    """Each chunk's first slot as a [1] int64 broadcast tensor (an input of `chunk_stats`)."""
    return [parallel.broadcast_array(np.array([c * plan.size], np.int64), placement) for c in range(plan.chunks)]


def all_chunk_stats(plan: ChunkPlan, prepared: Prepared, offsets: list, stats):
    """`stats(xs, positions, slot, owner, offset[, col_bias])` (`chunk_stats`, or the compiled job
    running it) over every chunk -> (each chunk's outputs, lse [K, world, N], p @ wn [K, world, N, D]
    or None): the one chunk loop of eager and graph mode."""
    out = []
    for c, offset in enumerate(offsets):
        cut = slice(c * plan.size, (c + 1) * plan.size)
        extra = [prepared.col_bias[:, cut]] if plan.col_bias else []
        out.append(stats(prepared.xs, prepared.positions[cut], prepared.slot, prepared.owner, offset, *extra))
    p_wn = flow.stack([s[2] for s in out]) if plan.embedding_grad else None
    return out, flow.stack([s[1] for s in out]), p_wn


def finish(head: PartialFC, prepared: Prepared, lse, p_wn, embeddings):
    """All chunks (module docstring, 3): lse [K, world, N] and p_wn [K, world, N, D] split(1)
    -> (loss, r [K, world, N] split(1), b [N], d loss / d embeddings split like them; without
    p_wn (no embedding gradient needed) the first three)."""
    n = prepared.xs.shape[0]
    target = prepared.target
    every = parallel.gather(lse)
    top = flow.maximum(every.amax(dim=(0, 1)), target)
    total = flow.exp(every - top).sum(dim=(0, 1)) + flow.exp(target - top)
    lse_all = top + flow.log(total)
    loss = (lse_all - target).mean()
    r = flow.exp(every - lse_all) / n  # [K, world, N] broadcast
    b = (flow.exp(target - lse_all) - 1.0) * prepared.slope / n
    r_own = parallel.own_split(r, 1)
    if p_wn is None:
        return loss, r_own, b
    d_xs = parallel.gather((p_wn * _rows(r_own, p_wn)).sum(dim=(0, 1))) + prepared.label_rows * b.unsqueeze(1)
    x = parallel.gather(embeddings)
    norm = flow.sqrt((x * x).sum(dim=1)).clamp(min=1e-12)  # F.normalize's eps
    xn = x / norm.unsqueeze(1)
    d_x = (d_xs - xn * (xn * d_xs).sum(dim=1, keepdim=True)) * (head.margin.scale / norm).unsqueeze(1)
    return loss, r_own, b, parallel.split_like(d_x, embeddings)


def chunk_row_grad(head: PartialFC, plan: ChunkPlan, p, r, xs, b, slot, owner, offset):
    """One chunk (module docstring, 4) -> g [world, k_c, D] split(0), d loss / d wn of the chunk's
    normalised rows: q^T xs with q = r p plus b at each row's label column. p [world, N, k_c],
    r [world, N] split(0). The row weights and the label terms ride on the [N, k_c] side of the
    one matmul (cheaper than on [k_c, D])."""
    q = p * _rows(r, p)
    marks, where = _label_marks(plan, head.world, slot, owner, offset)
    q = flow.scatter_add(q, 2, where.unsqueeze(2), (marks * b.unsqueeze(0)).unsqueeze(2))
    return flow.matmul(q, parallel.per_rank(xs), transpose_a=True)


def rows_grad(p: np.ndarray, r: np.ndarray, xs: np.ndarray, b: np.ndarray, slot: np.ndarray, owner: np.ndarray,
              start: int, rank: int) -> np.ndarray:
    """`chunk_row_grad` on one rank's block, in numpy (the compiled step's form, train/fc_rows.py):
    p [N, k_c] this rank's chunk, r [N] its row weights, start the chunk's first slot -> g [k_c, D].
    q^T xs with q = r p + b at each row's label column is p^T (r xs) plus b xs added at the label
    rows: the row weights ride on the [N, D] side, and the matmul runs in numpy's BLAS (AVX kernels
    for this CPU; OneFlow 0.9's bundled OpenBLAS runs Prescott's, 3.2-3.5x slower: docs/BENCHMARKS.md P2f)."""
    g = p.T @ (xs * r[:, None])
    at = slot - start
    mine = (owner == rank) & (at >= 0) & (at < p.shape[1])
    np.add.at(g, at[mine], xs[mine] * b[mine, None])
    return g


def rows_gradient(w: np.ndarray, g: np.ndarray, decay: float) -> np.ndarray:
    """d loss / d w of rows w [n, D] (float32) from g = d loss / d (w / |w|), plus SGD's row
    penalty decay * w: g / |w| - w <w, g> / |w|^3 (g / eps alone below F.normalize's eps), the
    chain rule of F.normalize written out (module docstring, 4)."""
    norm = np.sqrt(np.einsum("ij,ij->i", w, w))
    inv = 1.0 / np.maximum(norm, NORM_EPS)
    along = np.einsum("ij,ij->i", w, g) * inv * inv * inv * (norm >= NORM_EPS) - np.float32(decay)
    return g * inv[:, None] - w * along[:, None]


def row_grad_link(head: PartialFC, plan: ChunkPlan, g, positions, offset):
    """Eager mode's form of 4: a scalar whose gradient w.r.t. the FC weight is the chunk's rows'
    (g through F.normalize's autograd, as at K = 1) and the kept rows' penalty on real columns."""
    rows = flow.transpose(flow.index_select(head.weight, 0, positions), 0, 1)  # [world, k_c, D]
    link = (F.normalize(rows, dim=2) * g).sum()
    if head.row_decay:  # not on the last chunk's padding (a duplicate of a real column)
        real = (offset + flow.arange(plan.size, dtype=flow.int64, placement=offset.placement,
                                     sbp=parallel.SBP_GATHERED)) < plan.kept
        link = link + 0.5 * head.row_decay * ((rows * rows).sum(dim=2) * parallel.per_rank(real.to(flow.float32))).sum()
    return link
