"""The FC head's peak memory per rank on CPU, and `Loss.fc_chunks: auto` (the smallest K that fits).

OneFlow 0.9 reuses memory between a compiled job's tensors on CUDA only: on the CPU every blob of
a job (each op's output, each reduction's scratch buffer, each input and output copy) has its own
buffer for the whole run, and the same job called again reuses them (docs/BENCHMARKS.md, P2c).
So the peak resident memory of a rank is the sum of fixed buffers, which `predict` counts:

    peak = process + weight + slots + sampling + logits + rows + vectors + batch (+ dense) (+ adamw)

bytes per rank, with L local classes, k kept per rank (max(ceil(r L), N) capped at L), K chunks of
c = ceil(k / K) columns (heads/streamed.py's ChunkPlan), N the global (micro-)batch, D the
embedding size, w ranks; pad = 1 when the classes are padded to a multiple of w (the head then
carries a -1e4 column bias), decay = 1 for sparse SGD with weight decay (the kept rows' penalty):

    term       K = 1 (GraphStep: one job)        K > 1 (StreamStep: prepare, stats xK, finish; host xK)
    process    BASE (Python, OneFlow, runtime; fitted, see below)      the same + JOB_BASE per extra job
    weight     4 L D                              4 L D
    slots      4 L D x slots (SGD momentum 1, none 0, AdamW 2)
    sampling   (44 + 4 w + 8) L with sampling: PartialFC's [L] vectors, the [w L] gathered host
               noise and the host noise itself (numpy + tensor); 36 L without sampling
    logits     (92 + 8 pad) N k                   (32 + 4 pad) N c + 4 N k
    rows       (32 + 20 decay) k D                (12 + 20) c D; AdamW (12 + 32) c D
    vectors    60 k                               84 k + 16 c
    batch      10 N D                             (104 + 126 eg + 24 K eg) N D, eg = 1 when a
                                                  backbone trains from the embeddings' gradient
    dense      8 L D (+ the rows term over L)     - (K > 1 needs sparse updates)
    adamw      ADAMW_EAGER k D: the kept rows' bias correction, eager (train/optim.py); at K > 1
               the host applies it with the update (in the rows term)

K = 1 runs one of two steps (`one_job`): on the CPU in FP32 with sparse updates, OneJobStep (the
streamed passes as one chunk, in one job with the backbone): its terms are the K > 1 column's at
K = 1 (c = k, no job beyond the one); otherwise GraphStep's (the K = 1 column).

The integer coefficients are counts of buffers, read from the compiled jobs
(`job_buffers`; bench/fc_memory_model.py tally prints them per job): at K = 1, 23 float32
[N, k] buffers of the one job (logits, margin, softmax, their gradient, and the reductions'
scratch: a CPU reduce_sum/reduce_max takes a scratch buffer as large as its input), 25 with the
padding bias; 8 [k, D] buffers (the kept rows, their normalisation and gradient), 13 with SGD's row
penalty. At K > 1, StatsGraph's 8 [N, c] buffers (matmul, label scatter, softmax, two row-max
scratches, nn.Graph's output copies), one more with a column bias, and outside the jobs the K
chunks' p kept between passes (4 N k in all); StatsGraph's 3 [c, D] buffers (the rows, their
normalisation) and the host's (train/fc_rows.py, numpy, read from its code, not a job): the
chunk's g, its rows, their gradient and two temporaries alive at once (HOST_ROWS_SGD), AdamW's
slots' rows three more (HOST_ROWS_ADAMW). `batch` sums the [N, D] buffers (PrepareGraph's 66,
StatsGraph's 20 and FinishGraph's 10 bytes per element without an embedding gradient, the host's
copy of xs and xs scaled by a chunk's row weights; with one, StatsGraph's p @ wn and its copies,
FinishGraph's [K, w, N, D] inputs and the eager stack of them); `vectors` the [k] and [c] index
and per-column vectors. What the formula leaves out (terms in N alone, a few MiB) and what it
cannot count (OneFlow's runtime, thread stacks, allocator slack) is in BASE and JOB_BASE, fitted
to the measured peak RSS (ru_maxrss) of bench/fc_part.py, 2 ranks, over several C, D and K:
docs/BENCHMARKS.md, "P2d", "P2f" and "P2g", has the tables (within 15 %).

The backbone is not counted: the prediction is the FC part alone (what bench/fc_part.py runs,
with the identity as backbone). A training run adds its backbone's jobs (docs/BENCHMARKS.md P3).
It is the compiled FP32 step's: eager mode frees its temporaries, and K = 1 under AMP with sparse
updates runs other jobs (train/amp_sparse.py); there it is an estimate, not measured.

`choose_chunks` (Loss.fc_chunks: auto): the smallest K in 1..MAX_CHUNKS whose predicted peak fits
the per-rank budget `Loss.fc_memory_gib`, by default this machine's MemTotal over its local ranks,
less a margin (`default_budget_gib`). K > 1 streams the sparse FC update (heads/streamed.py), so
auto returns 1 when the head cannot stream (no sampling, dense updates, gradient accumulation).
When nothing fits it raises DoesNotFit (the run's ConfigError) naming Loss.fc_memory_gib rather than starting a run the
kernel would kill minutes later (or that would push another process out on a shared machine): an
explicit budget or an integer fc_chunks overrides the check.
"""
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

GIB = 2 ** 30
# process, OneFlow runtime, and the head's terms in N alone (fitted, docs/BENCHMARKS.md P2d: 0.45 on the
# box of P2d-P2f; P2g's box holds about 0.12 GiB more at every K, so the larger: auto's K fits on both)
BASE_GIB = 0.57
JOB_BASE_GIB = 0.0  # per compiled job beyond the first (fitted)
ADAMW_EAGER = 24  # bytes per kept element of the AdamW bias correction's eager temporaries (fitted)
# K > 1: bytes per [c, D] element the host's row gradient and update hold at once (numpy temporaries of
# train/fc_rows.py, read from its code: g, the rows, their gradient and two temporaries; AdamW's
# two slots' rows and their temporaries three more)
HOST_ROWS_SGD, HOST_ROWS_ADAMW = 20, 32
MAX_CHUNKS = 64  # beyond it the [K, w, N, D] terms grow faster than the chunks' shrink
# default budget: MemTotal / local ranks, less a margin for what runs beside the ranks (the kernel,
# the launcher, about 0.4 GiB; shared library pages RSS counts in every rank) and for the
# prediction's error (within 15 %, docs/BENCHMARKS.md P2d): MARGIN_FRACTION of each rank's share
# plus MARGIN_GIB
MARGIN_FRACTION = 0.10
MARGIN_GIB = 0.5


@dataclass(frozen=True)
class HeadShape:
    """What the formula needs of a head and its optimizer (see the module docstring)."""
    local: int  # L, local classes per rank (padded)
    kept: int  # k, kept columns per rank
    dim: int  # D
    batch: int  # N, the global micro-batch
    world: int  # w
    slots: int  # optimizer slots per FC weight element
    sparse: bool  # sparse (indexed-slices) FC update
    padded: bool  # classes padded to a multiple of w: a -1e4 column bias
    row_decay: bool  # sparse SGD's kept-row penalty
    adamw_correction: bool  # sparse AdamW's eager bias correction of the kept rows
    embedding_grad: bool = True  # a backbone trains: the chunks also compute p @ wn (heads/streamed.py)
    one_job: bool = False  # K = 1 runs the streamed passes as one job (`one_job`), not GraphStep's step

    @property
    def sampling(self) -> bool:
        return self.kept < self.local

    @classmethod
    def of(cls, cfg, head, batch: int, embedding_grad: bool = True) -> "HeadShape":
        opt = cfg.Optimizer
        slots = 2 if opt.name == "adamw" else (1 if opt.momentum > 0 else 0)
        return cls(head.local_classes, head.num_sample, head.embedding_size, batch, head.world, slots,
                   bool(head.sparse_update), head.pad_bias is not None, bool(head.row_decay),
                   bool(head.sparse_update) and opt.name == "adamw", embedding_grad, one_job(cfg, head))


def chunk_plan(kept: int, chunks: int) -> Tuple[int, int]:
    """(chunks run, columns per chunk) for K asked: heads/streamed.py's ChunkPlan.of."""
    size = math.ceil(kept / max(1, chunks))
    return math.ceil(kept / size), size


def predict(s: HeadShape, chunks: int = 1) -> Dict[str, float]:
    """The predicted peak per rank, in bytes, term by term (module docstring); "total" sums them."""
    L, k, D, N, w = s.local, s.kept, s.dim, s.batch, s.world
    pad, decay = int(s.padded), int(s.row_decay)
    out = {"process": BASE_GIB * GIB, "weight": 4.0 * L * D, "slots": 4.0 * L * D * s.slots,
           "sampling": (44 + 4 * w + 8) * L if s.sampling else 36.0 * L}
    if chunks <= 1 and not s.one_job:
        out.update(logits=(92 + 8 * pad) * N * k, rows=(32 + 20 * decay) * k * D, vectors=60.0 * k,
                   batch=10.0 * N * D)
        if not s.sparse and s.sampling:
            out["dense"] = 8.0 * L * D
        if s.adamw_correction:
            out["adamw"] = float(ADAMW_EAGER) * k * D
    else:
        K, c = chunk_plan(k, chunks)
        eg = int(s.embedding_grad)
        # jobs beyond K = 1's one: PrepareGraph, StatsGraph, FinishGraph, and with a backbone that
        # trains its ForwardGraph and BackboneGraph (train/streamed_step.py)
        out["process"] += (3 + 2 * eg - 1) * JOB_BASE_GIB * GIB if K > 1 else 0.0
        out.update(logits=(32 + 4 * pad) * N * c + 4.0 * N * k,
                   rows=(12 + (HOST_ROWS_ADAMW if s.adamw_correction else HOST_ROWS_SGD)) * c * D,
                   vectors=84.0 * k + 16.0 * c, batch=(104 + 126 * eg + 24 * K * eg) * N * D)
    out["total"] = sum(out.values())
    return out


def predicted_gib(s: HeadShape, chunks: int = 1) -> float:
    return predict(s, chunks)["total"] / GIB


def meminfo_total_gib(path: str = "/proc/meminfo") -> float:
    with open(path) as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / GIB
    raise OSError(f"{path}: no MemTotal line")


def local_ranks() -> int:
    """Ranks of this run on this machine (world size over nodes)."""
    import oneflow as flow
    return max(1, flow.env.get_world_size() // max(1, flow.env.get_node_size()))


def default_budget_gib(total_gib: Optional[float] = None, ranks: Optional[int] = None) -> float:
    """This machine's memory per local rank, less the margin (MARGIN_FRACTION of it + MARGIN_GIB)."""
    total = meminfo_total_gib() if total_gib is None else total_gib
    share = total / (local_ranks() if ranks is None else ranks)
    return share * (1.0 - MARGIN_FRACTION) - MARGIN_GIB


class DoesNotFit(ValueError):
    """No K fits the budget (train/system.py turns it into the run's ConfigError: heads sit below
    the config layer)."""


@dataclass(frozen=True)
class FCMemory:
    """The K of a run and its predicted peak per rank (GiB) against the budget (GiB)."""
    chunks: int
    predicted_gib: float
    budget_gib: float

    @property
    def fits(self) -> bool:
        return self.predicted_gib <= self.budget_gib

    def describe(self) -> str:
        k = f"K = {self.chunks} chunk{'s' if self.chunks > 1 else ''}"
        return (f"FC head: {k}, predicted peak {self.predicted_gib:.2f} GiB per rank "
                f"(the FC part; budget {self.budget_gib:.2f} GiB)")


def streamable(cfg, head) -> bool:
    """Whether this run can stream its head (K > 1): sparse FC updates, no gradient accumulation."""
    return bool(head.sparse_update) and cfg.Optimizer.accum_steps <= 1


def one_job(cfg, head) -> bool:
    """Whether K = 1 runs the streamed passes as one compiled job with the FC's rows updated on the
    host (train/streamed_step.py OneJobStep): graph mode on the CPU, FP32, sparse updates. Else
    (eager, AMP, dense updates, a GPU) K = 1 is GraphStep's single step (train/system.py)."""
    return (streamable(cfg, head) and cfg.Global.mode == "graph" and not cfg.AMP.enable
            and head.weight.placement.type == "cpu")


def budget_gib(cfg) -> float:
    return float(cfg.Loss.fc_memory_gib) or default_budget_gib()


def candidates(shape: HeadShape, streams: bool) -> List[int]:
    """K values auto considers, smallest first: 1, then every K in 2..MAX_CHUNKS that runs a
    different chunk size (ChunkPlan runs ceil(k / ceil(k / K)) chunks)."""
    out = [1]
    if streams:
        for chunks in range(2, MAX_CHUNKS + 1):
            run, _ = chunk_plan(shape.kept, chunks)
            if run == chunks and run > out[-1]:
                out.append(run)
    return out


def memory_of(cfg, head, batch: int, chunks: int, embedding_grad: bool = True) -> FCMemory:
    """The prediction for a K already chosen (the start-of-run line)."""
    shape = HeadShape.of(cfg, head, batch, embedding_grad)
    run = chunk_plan(shape.kept, chunks)[0] if chunks > 1 else 1
    return FCMemory(run, predicted_gib(shape, run), budget_gib(cfg))


def choose_chunks(cfg, head, micro_global_batch: int, embedding_grad: bool = True) -> FCMemory:
    """Loss.fc_chunks: auto. The smallest K whose predicted peak fits the budget (module
    docstring); K = 1 when the head cannot stream. DoesNotFit when no K fits."""
    shape = HeadShape.of(cfg, head, micro_global_batch, embedding_grad)
    budget = budget_gib(cfg)
    options = [FCMemory(k, predicted_gib(shape, k), budget) for k in candidates(shape, streamable(cfg, head))]
    for option in options:
        if option.fits:
            return option
    best = min(options, key=lambda o: o.predicted_gib)
    where = "Loss.fc_memory_gib" if cfg.Loss.fc_memory_gib else "Loss.fc_memory_gib (0: this machine's)"
    how = (f"even in {best.chunks} chunks" if best.chunks > 1 else
           "and it cannot stream in chunks (needs Loss.sample_rate < 1, Optimizer.sparse_fc_update=true, "
           "Optimizer.accum_steps=1)")
    raise DoesNotFit(f"{where}: the FC head of {head.num_classes} classes x {shape.dim} needs a predicted "
                      f"{best.predicted_gib:.2f} GiB per rank {how}, over the budget of {budget:.2f} GiB; "
                      f"raise Loss.fc_memory_gib, set Loss.fc_chunks to an integer, or use more ranks")


# ---------------------------------------------------------------------------------------- job tally
# DataType enum of OneFlow's protos -> bytes (char, float, double, int8, int32, int64, uint8, ...)
_DTYPE_BYTES = {1: 1, 2: 4, 3: 8, 4: 1, 5: 4, 6: 8, 7: 1, 9: 2, 11: 2, 12: 1}
_REDUCTIONS = ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod")


def job_buffers(graph, world: int) -> List[Tuple[str, str, int, int]]:
    """(blob name, op type, elements on one rank, bytes per element) of every buffer of a compiled
    nn.Graph's job, but its variables: each op output (its logical shape over the ranks of a split),
    the scratch buffer of each reduction (its input's size: OneFlow's CPU reduce kernels ask that
    much) and nn.Graph's two eager buffers per output. What `predict` counts, from the job itself."""
    from of_face.oneflow_compat import full_graph_proto

    job = full_graph_proto(graph)
    sbp = job.job_parallel_view_conf.op_name2nd_sbp_signature_conf
    kinds, inputs = {}, {}
    for op in job.net.op:
        kind = op.WhichOneof("op_type")
        kinds[op.name] = op.user_conf.op_type_name if kind == "user_conf" else kind
        if kind == "user_conf":
            inputs[op.name] = [lbn for v in op.user_conf.input.values() for lbn in v.s]

    def size(lbn: str) -> Tuple[int, int]:
        desc = job.helper.lbn2logical_blob_desc[lbn]
        n = math.prod(desc.shape.dim)
        op, bn = lbn.split("/", 1)
        if op in sbp and bn in sbp[op].bn_in_op2nd_sbp:
            if sbp[op].bn_in_op2nd_sbp[bn].sbp_parallel[0].HasField("split_parallel"):
                n //= world
        return n, _DTYPE_BYTES.get(desc.data_type, 4)

    out = []
    for lbn in job.helper.lbn2logical_blob_desc:
        op = lbn.split("/", 1)[0]
        kind = kinds.get(op, "?")
        if kind == "variable_conf":
            continue
        out.append((lbn, kind) + size(lbn))
        if kind in _REDUCTIONS and inputs.get(op):
            out.append((lbn + ":scratch", kind) + size(inputs[op][0]))
        if kind == "output_conf":
            n, b = size(lbn)
            out.append((lbn + ":eager x2", kind, n, 2 * b))  # (two buffers: as one of twice the bytes)
    return out


def coefficients(graph, s: HeadShape, chunks: int = 1) -> Dict[str, float]:
    """A compiled job's buffers (`job_buffers`) as bytes per element of the formula's shapes:
    {"N*c": 24.0, "c*D": 12.0, ...} means 24 bytes per element of [N, c] (six float32 buffers),
    and so on; "other" sums the bytes of buffers of no such size (the terms in N alone)."""
    K, c = chunk_plan(s.kept, chunks) if chunks > 1 else (1, s.kept)
    N, D, w, L = s.batch, s.dim, s.world, s.local
    sizes = {"N*c": N * c, "c*D": c * D, "L*D": L * D, "w*N*D": w * N * D, "N*D": N * D, "K*N*D": K * N * D,
             "L": L, "w*L": w * L, "k": s.kept, "c": c, "N*D/w": N * D // w}
    out: Dict[str, float] = {}
    for _, _, n, nbytes in job_buffers(graph, w):
        name = next((name for name, v in sizes.items() if v == n), "other")
        out[name] = out.get(name, 0.0) + (n * nbytes / sizes[name] if name != "other" else n * nbytes)
    return out


__all__ = ["FCMemory", "HeadShape", "choose_chunks", "coefficients", "default_budget_gib", "job_buffers", "memory_of",
           "predict", "predicted_gib"]
