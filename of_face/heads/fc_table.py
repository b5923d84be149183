"""The FC weight's layout over the ranks: padded classes, each rank's rows, and the conversion
to and from the [classes, dim] rows that checkpoints and tests use.

The weight is a table [local, world, dim] split along its middle axis: rank r's memory holds
its own classes r*local + j, j < local (heads/partial_fc.py says why a table). Classes are padded
up to world * local so every rank owns as many; the padding classes are the last positions of
the last rank. [classes, ...] rows are in rank-major order: class r*local + j is row r*local + j.
Placement itself is of_face/parallel.py's (this module asks it for "this rank's piece, split
along axis 1"); the class arithmetic is here.
"""
import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import numpy as np
import oneflow as flow

from of_face import parallel

TABLE_AXIS = 1  # the table [local, world, ...] is split along the world axis
# reads the stored rows [start, stop) of one key into `out` (a checkpoint's FC rows, any format)
RowReader = Callable[[int, int, np.ndarray], None]


def padded_classes(num_classes: int, world: Optional[int] = None) -> int:
    """Class count rounded up so every rank owns an equal slice of the FC weight."""
    world = world or parallel.world_size()
    return int(math.ceil(num_classes / world) * world)


@dataclass(frozen=True)
class FCTable:
    """The layout of `num_classes` classes over `world` ranks."""
    num_classes: int
    world: int

    @classmethod
    def of(cls, num_classes: int, world: Optional[int] = None) -> "FCTable":
        return cls(int(num_classes), int(world or parallel.world_size()))

    @property
    def padded(self) -> int:
        return padded_classes(self.num_classes, self.world)

    @property
    def local(self) -> int:
        return self.padded // self.world

    def own_range(self, rank: Optional[int] = None) -> Tuple[int, int]:
        """Rows [start, stop) of the padded classes rank `rank` (default: this one) holds."""
        r = parallel.rank() if rank is None else rank
        return r * self.local, (r + 1) * self.local

    def row_range(self, rank: int) -> Tuple[int, int]:
        """The real (unpadded) class rows rank `rank` owns: [start, stop) of [0, num_classes)."""
        start, stop = self.own_range(rank)
        return min(start, self.num_classes), min(stop, self.num_classes)

    def shard_ranges(self) -> List[Tuple[int, int]]:
        return [self.row_range(r) for r in range(self.world)]

    def pad(self, rows: np.ndarray) -> np.ndarray:
        """[classes or fewer, ...] rows -> [padded, ...], zero rows appended."""
        missing = self.padded - rows.shape[0]
        return rows if missing == 0 else np.concatenate([rows, np.zeros((missing,) + rows.shape[1:], rows.dtype)])

    def random(self, dim: int, std: float, device: str = "auto") -> flow.Tensor:
        """N(0, std) class centres, each rank drawing only its own rows: a fresh run's FC weight."""
        return parallel.normal_split((self.local, self.world, dim), std, TABLE_AXIS, device)

    def from_rows(self, rows: np.ndarray, device: str = "auto") -> flow.Tensor:
        """Whole [classes or padded, ...] rows (every rank passes them) -> the table. Each rank
        materialises only its own rows (no full-size copy per rank)."""
        start, stop = self.own_range()
        return place_rows(self.pad(rows)[start:stop], device=device)

    def restore(self, read: RowReader, stored: int, ref: flow.Tensor, into: bool = False) -> Optional[flow.Tensor]:
        """This rank's rows of a checkpoint's table of `stored` classes, placed like `ref`.

        Rows past the stored classes (padding of another world size, or classes added on resume)
        are zero, except with `into`: then the rows are read into `ref` itself and those rows keep
        `ref`'s values (the fresh run's initialisation); a CPU `ref` is read in place, needing no
        host memory beyond the tensor (returns None)."""
        start, stop = self.own_range()
        local = local_rows(ref)
        cpu = into and local.device.type == "cpu"
        if cpu:
            buf = local.numpy()  # the tensor's own memory
        elif into:
            buf = local.numpy().copy()
        else:
            buf = np.zeros(tuple(local.shape), flow.convert_oneflow_dtype_to_numpy_dtype(ref.dtype))
        a, b = start, min(stop, stored)
        if a < b:
            read(a, b, buf[:b - a])
        if cpu:
            return None
        return place_rows(buf, ref)


# ----------------------------------------------------------------- tensors of the table layout


def is_table(t) -> bool:
    return isinstance(t, flow.Tensor) and t.ndim >= 2 and parallel.split_axis(t) == TABLE_AXIS


def num_rows(t: flow.Tensor) -> int:
    """Padded class count of an FC table [local, world, ...] (or of a [classes, ...] tensor)."""
    return t.shape[0] * t.shape[1] if is_table(t) else t.shape[0]


def local_rows(t: flow.Tensor) -> flow.Tensor:
    """This rank's own rows [local, ...] of an FC table (a view of its local tensor)."""
    local = t.to_local()
    return local.view(local.shape[0], *local.shape[2:]) if is_table(t) else local


def place_rows(local: np.ndarray, ref: Optional[flow.Tensor] = None, device: str = "auto") -> flow.Tensor:
    """This rank's own [local, ...] rows (numpy) -> the FC table, placed like `ref` when given
    (no second host copy)."""
    return parallel.place_split(np.expand_dims(local, TABLE_AXIS), TABLE_AXIS, ref, device)


def class_split(local: np.ndarray, device: str = "auto") -> flow.Tensor:
    """This rank's own slice of a vector along classes (numpy) -> a global [world * n] split(0)."""
    return parallel.place_split(local, 0, device=device)


def table_to_rows(a: np.ndarray) -> np.ndarray:
    """A whole FC table [local, world, ...] (numpy) -> [classes, ...] in rank-major class order."""
    return np.ascontiguousarray(np.swapaxes(a, 0, 1)).reshape((-1,) + a.shape[2:])


def rows_to_table(rows: np.ndarray, world: int) -> np.ndarray:
    """[padded classes, ...] rank-major rows (numpy) -> the whole table [local, world, ...]."""
    return np.swapaxes(rows.reshape((world, -1) + rows.shape[1:]), 0, 1)


def rows(t: flow.Tensor) -> np.ndarray:
    """An FC table's whole value as [classes, ...] numpy on every rank (collective)."""
    return table_to_rows(parallel.to_numpy(t)) if is_table(t) else parallel.to_numpy(t)


def rows_rank0(t: flow.Tensor) -> Optional[np.ndarray]:
    """An FC table's whole value as [classes, ...] numpy on rank 0, None elsewhere (collective)."""
    a = parallel.to_rank0_numpy(t)
    return table_to_rows(a) if a is not None and is_table(t) else a


def load_rows(t: flow.Tensor, rows_: np.ndarray) -> None:
    """Copy whole [padded classes, ...] rows (every rank passes them) into the FC table `t`."""
    padded = np.zeros((num_rows(t),) + rows_.shape[1:], rows_.dtype)
    padded[:rows_.shape[0]] = rows_
    parallel.load_into(t, rows_to_table(padded, t.shape[TABLE_AXIS]) if is_table(t) else padded)


def rows_table(rows_: flow.Tensor, world: int) -> flow.Tensor:
    """Inverse of `table_rows`: [world*k, ...] split(0) -> FC table rows [k, world, ...] split(1)."""
    k = rows_.shape[0] // world
    return flow.transpose(rows_.reshape(world, k, *rows_.shape[1:]), 0, 1)


def table_rows(t: flow.Tensor) -> flow.Tensor:
    """FC table rows [k, world, ...] split(1) -> [world*k, ...] split(0), rank-major: a local
    transpose (each rank's [k, ...] rows stay where they are)."""
    rows_ = flow.transpose(t, 0, 1)
    return rows_.reshape(t.shape[0] * t.shape[1], *t.shape[2:])
