"""How the model is split over ranks: the one place that names placements and SBPs.

Reading this file alone should tell how training is parallelised:

| tensor                      | SBP          | meaning                                         |
|-----------------------------|--------------|-------------------------------------------------|
| images, labels (the batch)  | split(0)     | data parallel: each rank holds its own samples  |
| backbone parameters         | broadcast    | replicated; gradients are all-reduced           |
| embeddings, labels in head  | broadcast    | all-gathered so every rank sees the whole batch |
| FC weight [classes, dim]    | split(0)     | model parallel: each rank owns a class slice    |
| logits [batch, classes]     | split(1)     | follows from broadcast x split(0) weight        |

Everything else asks this module instead of writing `flow.sbp` literals.
"""
import math

import numpy as np
import oneflow as flow

SBP_BATCH = (flow.sbp.split(0),)
SBP_PARAM = (flow.sbp.broadcast,)
SBP_GATHERED = (flow.sbp.broadcast,)
SBP_FC_WEIGHT = (flow.sbp.split(0),)
SBP_LOGITS = (flow.sbp.split(1),)


def device_type(device="auto"):
    if device == "auto":
        return "cuda" if flow.cuda.is_available() else "cpu"
    if device == "cuda" and not flow.cuda.is_available():
        raise RuntimeError("Global.device=cuda but OneFlow sees no CUDA device")
    return device


def world_size():
    return flow.env.get_world_size()


def rank():
    return flow.env.get_rank()


def placement(device="auto"):
    """All ranks of the launcher's world, on CPU or one GPU per rank."""
    return flow.placement(device_type(device), ranks=list(range(world_size())))


def padded_classes(num_classes, world=None):
    """Class count rounded up so every rank owns an equal slice of the FC weight."""
    world = world or world_size()
    return int(math.ceil(num_classes / world) * world)


def batch(local_array, dtype=None, device="auto"):
    """This rank's numpy shard -> one global tensor split along the batch."""
    t = flow.tensor(local_array, dtype=dtype)
    return t.to_global(placement=placement(device), sbp=SBP_BATCH)


def gather(t, keep_grad_split=False):
    """Any global tensor -> broadcast (every rank holds the whole tensor).

    keep_grad_split: the gradient flowing back keeps `t`'s own SBP. Needed where `t` comes out
    of the backbone (its features, split along the batch): OneFlow 0.9 otherwise returns a
    broadcast gradient into the backbone's last BatchNorm, whose backward then gives every rank a
    different "broadcast" gradient that is never all-reduced, and the replicas drift apart.
    """
    if keep_grad_split:
        return t.to_global(sbp=SBP_GATHERED, grad_sbp=t.sbp)
    return t.to_global(sbp=SBP_GATHERED)


def to_numpy(t):
    """A global tensor's full value as numpy, on every rank (collective: all ranks call it)."""
    return gather(t).to_local().numpy()


def broadcast_module(module, device="auto"):
    """Replicate a backbone: parameters and buffers broadcast over all ranks."""
    return module.to_global(placement=placement(device), sbp=SBP_PARAM)


def fc_weight(array, device="auto"):
    """A full [classes, dim] numpy weight -> global tensor split along classes.

    Each rank materialises only its own slice (no full-size copy per rank).
    """
    n = array.shape[0] // world_size()
    local = np.ascontiguousarray(array[rank() * n : (rank() + 1) * n])
    return flow.tensor(local).to_global(placement=placement(device), sbp=SBP_FC_WEIGHT)


def fc_shard(local_array, device="auto"):
    """This rank's own slice along classes (numpy) -> global tensor split along classes."""
    return flow.tensor(local_array).to_global(placement=placement(device), sbp=SBP_FC_WEIGHT)


def fc_weight_random(num_rows, dim, std, device="auto"):
    """N(0, std) class centres generated shard by shard, split along classes."""
    return flow.normal(0.0, std, (num_rows, dim), placement=placement(device), sbp=SBP_FC_WEIGHT)


def barrier():
    flow.comm.barrier()
