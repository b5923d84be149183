"""How the model is split over ranks: the one place that names placements and SBPs.

Reading this file alone should tell how training is parallelised:

| tensor                      | SBP          | meaning                                         |
|-----------------------------|--------------|-------------------------------------------------|
| images, labels (the batch)  | split(0)     | data parallel: each rank holds its own samples  |
| backbone parameters         | broadcast    | replicated; gradients are all-reduced           |
| embeddings, labels in head  | broadcast    | all-gathered so every rank sees the whole batch |
| FC weight [local, world, d] | split(1)     | model parallel: rank r owns classes r*local + j |
| kept FC rows [world*k, d]   | split(0)     | each rank's own kept rows, in rank order        |
| logits [batch, world*k]     | split(1)     | follows from broadcast x split(0) rows          |

The FC weight is stored as a [local, world, dim] table split along its middle axis (each rank's
memory is its own [local, dim] rows) rather than [classes, dim] split(0): an `index_select`
along axis 0 with one broadcast position list then reads, on every rank, only its own rows,
and nn.Graph compiles its gradient plus the optimizer into an indexed-slices update (see
heads/partial_fc.py). heads/fc_table.py converts to and from the [classes, dim] order
(rank-major) that checkpoints and tests use, through the generic primitives here
(`place_split`, `split_axis`, `normal_split`).

Everything else asks this module instead of writing `flow.sbp` literals.
"""
import contextlib
import os
import zlib
from typing import Dict, Iterator, List, Optional

import numpy as np
import oneflow as flow

from of_face.oneflow_compat import sync

SBP_BATCH = (flow.sbp.split(0),)
SBP_PARAM = (flow.sbp.broadcast,)
SBP_GATHERED = (flow.sbp.broadcast,)
SBP_FC_WEIGHT = (flow.sbp.split(0),)  # class-split vectors and rows [classes or world*k, ...]
SBP_FC_TABLE = (flow.sbp.split(1),)  # the FC weight table [local, world, dim]
SBP_LOGITS = (flow.sbp.split(1),)


def device_type(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if flow.cuda.is_available() else "cpu"
    if device == "cuda" and not flow.cuda.is_available():
        raise RuntimeError("Global.device=cuda but OneFlow sees no CUDA device")
    return device


def world_size() -> int:
    return flow.env.get_world_size()


def rank() -> int:
    return flow.env.get_rank()


def pin_local_cpus() -> Optional[List[int]]:
    """Keep every thread of this rank to its own block of the CPUs this process may use (block
    r of L equal blocks, r the local rank, L the ranks on this machine); the block, or None
    when there is nothing to share (one local rank, or fewer CPUs than local ranks).

    Why: OneFlow 0.9's VM scheduler thread spins (sched_yield) for as long as a compiled job
    runs. With as many ranks as CPUs, unpinned, a rank's scheduler takes CPU time from the other
    rank's kernels (a yield gives way only to threads queued on its own CPU); pinned, it gives
    way to its own rank's kernels. Measured: the FC at 1M classes, 512-d, 2 ranks on 2 CPUs,
    2.02 -> 1.72 s a step (docs/BENCHMARKS.md, P2e). Threads started later inherit the block."""
    local = max(1, world_size() // max(1, flow.env.get_node_size()))
    cpus = sorted(os.sched_getaffinity(0))
    if local <= 1 or len(cpus) < local:
        return None
    per, r = len(cpus) // local, flow.env.get_local_rank()
    block = set(cpus[r * per:(r + 1) * per])
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), block)
        except OSError:  # (a thread that ended meanwhile)
            pass
    return sorted(block)


def placement(device: str = "auto") -> flow.placement:
    """All ranks of the launcher's world, on CPU or one GPU per rank."""
    return flow.placement(device_type(device), ranks=list(range(world_size())))


def batch(local_array: np.ndarray, dtype=None, device: str = "auto") -> flow.Tensor:
    """This rank's numpy shard -> one global tensor split along the batch."""
    t = flow.tensor(local_array, dtype=dtype)
    return t.to_global(placement=placement(device), sbp=SBP_BATCH)


def gather(t: flow.Tensor, keep_grad_split: bool = False) -> flow.Tensor:
    """Any global tensor -> broadcast (every rank holds the whole tensor).

    keep_grad_split: the gradient flowing back keeps `t`'s own SBP. Needed where `t` comes out
    of the backbone (its features, split along the batch): OneFlow 0.9 otherwise returns a
    broadcast gradient into the backbone's last BatchNorm, whose backward then gives every rank a
    different "broadcast" gradient that is never all-reduced, and the replicas drift apart.
    """
    if keep_grad_split:
        return t.to_global(sbp=SBP_GATHERED, grad_sbp=t.sbp)
    return t.to_global(sbp=SBP_GATHERED)


def own_split(t: flow.Tensor, axis: int) -> flow.Tensor:
    """A broadcast tensor -> split along `axis`: each rank keeps its own slice (no data moves)."""
    return t.to_global(sbp=(flow.sbp.split(axis),))


def per_rank(t: flow.Tensor) -> flow.Tensor:
    """A broadcast tensor [...] -> [world, ...] split(0): every rank holds it as its own block,
    so a batched op over the first axis runs on each rank's own data (heads/streamed.py)."""
    return own_split(t.unsqueeze(0).repeat(world_size(), *([1] * t.ndim)), 0)


def split_like(t: flow.Tensor, ref: flow.Tensor) -> flow.Tensor:
    """A broadcast tensor -> placed with `ref`'s SBP (a split: each rank keeps its slice)."""
    return t.to_global(sbp=ref.sbp)


def to_numpy(t: flow.Tensor) -> np.ndarray:
    """A global tensor's full value as numpy, on every rank (collective: all ranks call it)."""
    return gather(t).to_local().numpy()


def broadcast_module(module: flow.nn.Module, device: str = "auto") -> flow.nn.Module:
    """Replicate a backbone: parameters and buffers broadcast over all ranks."""
    return module.to_global(placement=placement(device), sbp=SBP_PARAM)


def split_axis(t) -> Optional[int]:
    """The axis a global tensor is split along (one SBP), None for a broadcast or local one."""
    if not isinstance(t, flow.Tensor) or not t.is_global or len(t.sbp) != 1:
        return None
    return next((axis for axis in range(t.ndim) if t.sbp[0] == flow.sbp.split(axis)), None)


def place_split(local: np.ndarray, axis: int, ref: Optional[flow.Tensor] = None, device: str = "auto") -> flow.Tensor:
    """This rank's own piece (numpy) of a tensor split along `axis` -> the global tensor, placed
    like `ref` (and in its dtype) when given. No second host copy: the tensor uses `local`'s memory."""
    dtype = flow.convert_oneflow_dtype_to_numpy_dtype(ref.dtype) if ref is not None else None
    t = flow.from_numpy(np.ascontiguousarray(local, dtype=dtype))
    return t.to_global(placement=ref.placement if ref is not None else placement(device), sbp=(flow.sbp.split(axis),))


def normal_split(shape, std: float, axis: int, device: str = "auto") -> flow.Tensor:
    """N(0, std) values of a global tensor split along `axis`, each rank drawing only its own piece."""
    return flow.normal(0.0, std, tuple(shape), placement=placement(device), sbp=(flow.sbp.split(axis),))


def barrier() -> None:
    flow.comm.barrier()


# ------------------------------------------------- moving whole values in and out (checkpoints)


def is_broadcast(t: flow.Tensor) -> bool:
    return t.is_global and all(s == flow.sbp.broadcast for s in t.sbp)


def is_replicated(t: flow.Tensor) -> bool:
    """A broadcast tensor on more than one rank (each rank holds a full copy)."""
    return is_broadcast(t) and len(t.placement.ranks) > 1


def to_rank0_numpy(t: flow.Tensor) -> Optional[np.ndarray]:
    """A tensor's whole value as numpy on rank 0 (None elsewhere); collective for split tensors."""
    if not t.is_global:
        return t.detach().numpy()
    if is_broadcast(t):
        return t.to_local().numpy() if rank() == 0 else None
    whole = t.to_global(placement=flow.placement(t.placement.type, ranks=[0]), sbp=flow.sbp.broadcast)
    return whole.to_local().numpy() if rank() == 0 else None


def place_like(array: np.ndarray, ref: flow.Tensor) -> flow.Tensor:
    """numpy value -> tensor placed and split like `ref` (every rank passes the whole value).

    A split tensor keeps only this rank's piece along its split axis (an FC table from [classes,
    ...] rows: heads/fc_table.py). A broadcast tensor gets this rank's own value, which may
    differ from rank 0's (see divergent_replicas)."""
    dtype = ref.dtype
    if not ref.is_global:
        return flow.tensor(array, dtype=dtype, device=ref.device)
    if is_broadcast(ref):
        t = flow.tensor(array, dtype=dtype).to_global(placement=ref.placement, sbp=ref.sbp)
        # to_global() takes rank 0's data for every rank: write this rank's own value afterwards
        t.to_local().copy_(flow.tensor(array, dtype=dtype, device=t.to_local().device))
        return t
    axis = split_axis(ref)
    ranks = list(np.asarray(ref.placement.ranks).reshape(-1))
    n = array.shape[axis] // len(ranks)
    r = ranks.index(rank())
    return place_split(np.take(array, range(r * n, (r + 1) * n), axis=axis), axis, ref)


def load_into(t: flow.Tensor, array: np.ndarray) -> None:
    """Copy a numpy value into an existing (global) tensor, this rank's own copy for a broadcast one."""
    t.copy_(place_like(array, t))
    if is_replicated(t):  # copy_ between broadcast tensors may also take rank 0's value
        t.to_local().copy_(flow.tensor(array, dtype=t.dtype, device=t.to_local().device))


def broadcast_array(array: np.ndarray, placement_: flow.placement) -> flow.Tensor:
    """A numpy value every rank holds -> broadcast global tensor with exactly that local value."""
    t = flow.tensor(array).to_global(placement=placement_, sbp=flow.sbp.broadcast)
    t.to_local().copy_(flow.tensor(array, device=t.to_local().device))
    return t


@contextlib.contextmanager
def rank0_replicas(tensors: List[flow.Tensor]) -> Iterator[None]:
    """Inside the block, every rank's copy of each replicated (broadcast) tensor holds rank 0's
    value; afterwards each rank gets its own copy back. Collective on entry.

    For BatchNorm running statistics, which each rank updates from its own samples (see
    divergent_replicas): evaluating inside this block evaluates rank 0's model, the one
    backbone.npz and the exports hold, whatever the number of ranks."""
    # local-tensor reads and writes are not ordered against compiled graphs that use the same
    # variables (the training step writes BatchNorm statistics): wait around them
    sync()
    replicated = [t for t in tensors if is_replicated(t)]
    own = [t.to_local().clone() for t in replicated]
    for t in replicated:
        value = t.to_local().clone()
        flow.comm.broadcast(value, 0)
        t.to_local().copy_(value)
    sync()
    try:
        yield
    finally:
        sync()
        for t, value in zip(replicated, own):
            t.to_local().copy_(value)
        sync()


def divergent_replicas(sources: Dict[str, flow.Tensor]) -> Dict[str, np.ndarray]:
    """{key: [world, ...] numpy on rank 0} for broadcast tensors whose local copies differ.

    A broadcast tensor should hold the same value on every rank, but BatchNorm on a batch split
    over ranks updates its running statistics from each rank's own samples (parameters stay
    equal: tests/test_twin.py checks it). Rank 0's copy alone would then not resume the run
    exactly, so every rank's copy of such a tensor is returned (found by comparing CRCs; nothing
    when the replicas agree). Collective: every rank calls it with the same keys."""
    keys = [k for k, t in sources.items() if is_replicated(t)]
    if not keys:
        return {}
    place = sources[keys[0]].placement
    crcs = np.array([zlib.crc32(np.ascontiguousarray(sources[k].to_local().numpy()).tobytes()) for k in keys],
                    np.int64)
    table = to_numpy(flow.tensor(crcs[None]).to_global(placement=place, sbp=flow.sbp.split(0)))  # [world, keys]
    out = {}
    for i, k in enumerate(keys):
        if (table[:, i] != table[0, i]).any():
            stacked = sources[k].to_local().unsqueeze(0).to_global(placement=sources[k].placement,
                                                                    sbp=flow.sbp.split(0))
            out[k] = to_rank0_numpy(stacked)
    return out


def all_gather_int(value: int) -> np.ndarray:
    """Every rank's `value`, [world] int64 on every rank (collective: all ranks call it)."""
    if world_size() == 1:
        return np.array([int(value)], np.int64)
    t = flow.tensor(np.array([[int(value)]], np.int64)).to_global(
        placement=flow.placement("cpu", ranks=list(range(world_size()))), sbp=flow.sbp.split(0))
    return to_numpy(t).reshape(-1)


def all_ok(ok: bool) -> bool:
    """True on every rank iff `ok` is true on every rank (collective: all ranks call it).

    How one rank's failure (a checkpoint write that hit a full disk, a run-folder lock held by
    another run) becomes every rank's decision, so no rank waits forever in a later collective."""
    return bool((all_gather_int(0 if ok else 1) == 0).all())


def place_local_like(local: np.ndarray, ref: flow.Tensor) -> flow.Tensor:
    """This rank's own piece (numpy) -> tensor placed and split like the split `ref`, without
    any rank holding the whole value."""
    return place_split(local, split_axis(ref), ref)
