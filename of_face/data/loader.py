"""Per-rank batches for data-parallel training with static shapes.

Every rank builds the same epoch order from ``numpy.random.default_rng([seed, epoch])``; global batch
``b`` is ``order[b*B*W : (b+1)*B*W]`` and rank ``r`` takes the ``r``-th slice of ``B`` samples of it,
so the shards are disjoint, together cover the epoch, and concatenating the ranks' batches in rank
order gives the global batch (what a tensor split on dim 0 across ranks expects). The tail of the
epoch that does not fill a whole global batch is dropped: nn.Graph compiles for one batch shape.

Augmentation is a horizontal flip done in numpy, decided by the same seeded generator (one coin per
dataset index and epoch). flowvision's RandomHorizontalFlip draws from a global RNG inside whichever
process runs it, which would make the result depend on the number and scheduling of workers.
Further augmentations (crop, colour jitter, greyscale; ``of_face/data/augment.py``) use a generator
per sample seeded from (seed, epoch, index) for the same reason.
"""
import collections
import multiprocessing
import multiprocessing.pool
import sys
import weakref
from typing import Any, Iterator, Optional, Protocol, Sequence, Tuple

import numpy as np

from of_face.data.augment import Augment, sample_rng

Batch = Tuple[np.ndarray, np.ndarray]  # (images [B, 3, H, W], labels int64 [B])


class Dataset(Protocol):
    """What the loader reads: item i is (uint8 image [H, W, 3], integer label)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Tuple[np.ndarray, int]: ...


def epoch_plan(num_samples: int, epoch: int, seed: int = 0, shuffle: bool = True,
               flip: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """Return (order, flip_of_index) for one epoch; identical on every rank.

    ``order`` is a permutation of ``range(num_samples)`` (identity when not shuffling);
    ``flip_of_index[i]`` says whether dataset item ``i`` is mirrored in this epoch.
    """
    rng = np.random.default_rng([int(seed), int(epoch)])
    order = rng.permutation(num_samples) if shuffle else np.arange(num_samples)
    # Drawn even without `flip` so that turning flipping off does not change anything else.
    coins = rng.random(num_samples) < 0.5
    if not flip:
        coins[:] = False
    return order.astype(np.int64), coins


def load_batch(dataset: Dataset, indices: Sequence[int], flips: Sequence[bool], augment: Optional[Augment] = None,
               stream: Tuple[int, int] = (0, 0)) -> Batch:
    """Decode ``dataset[i]`` for each index, mirror where asked, then ``augment`` it with the sample's
    generator for ``stream`` = (seed, epoch); return (uint8 [B,3,H,W], int64 [B])."""
    images, labels = [], []
    for index, mirror in zip(indices, flips):
        image, label = dataset[int(index)]
        if mirror:
            image = image[:, ::-1]
        if augment is not None and augment.active:
            image = augment(image, sample_rng(*stream, index))
        images.append(image)
        labels.append(label)
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise ValueError(f"images in one batch differ in size: {sorted(shapes)}; all must be equal")
    batch = np.stack(images).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(batch), np.asarray(labels, dtype=np.int64)


class SkipBadRecords:
    """A dataset whose unreadable items (the reader's ValueError: undecodable, truncated, wrong
    size) are replaced by the next readable item, each one counted with a warning on stderr.
    Deterministic: the replacement depends only on the index, so batches stay the same for any
    number of loader workers. Labels are those of the replacement."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self.skipped = 0  # in this process (loader workers count their own)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:  # labels(), num_classes, ... of the wrapped set
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> Tuple[np.ndarray, int]:
        n = len(self.dataset)
        for k in range(n):
            try:
                return self.dataset[(int(index) + k) % n]
            except ValueError as e:
                self.skipped += 1
                print(f"warning: {e}; skipped (Data.skip_bad_records=true; {self.skipped} skipped so far "
                      "by this process)", file=sys.stderr, flush=True)
        raise ValueError(f"no readable image among the {n} of the data set")


def normalize(batch_uint8: np.ndarray) -> np.ndarray:
    """uint8 [B,3,H,W] -> float32 in [-1, 1], i.e. (x / 255 - 0.5) / 0.5."""
    return (batch_uint8.astype(np.float32) / np.float32(255.0) - np.float32(0.5)) / np.float32(0.5)


# Worker processes keep the dataset in a module global set by the pool initializer, so that it is
# sent (or inherited, with fork) once per worker instead of once per batch.
_WORKER_DATASET = _WORKER_AUGMENT = None


def _init_worker(dataset: Dataset, augment: Optional[Augment] = None) -> None:
    global _WORKER_DATASET, _WORKER_AUGMENT
    _WORKER_DATASET, _WORKER_AUGMENT = dataset, augment


def _worker_load_batch(indices: np.ndarray, flips: np.ndarray, stream: Tuple[int, int]) -> Batch:
    return load_batch(_WORKER_DATASET, indices, flips, _WORKER_AUGMENT, stream)


class ShardedLoader:
    """Iterate over this rank's share of every global batch of an epoch.

    Yields ``(images float32 [B,3,H,W] in [-1, 1], labels int64 [B])`` numpy arrays, ``B = batch_size``
    (per rank). ``num_workers > 0`` decodes in a process pool (one task per batch, ``prefetch``
    batches per worker in flight); output is identical to ``num_workers=0``. ``augment``: an
    ``of_face.data.augment.Augment`` (or None) applied after the flip.
    ``start_method``: 'fork' starts fast and is what PyTorch's loader uses on Linux; the workers
    only decode images with PIL and never touch OneFlow. Use 'spawn' if a parent's threads ever
    make fork unsafe.
    """

    def __init__(self, dataset: Dataset, batch_size: int, rank: int, world_size: int, seed: int = 0,
                 num_workers: int = 0, shuffle: bool = True, flip: bool = True, prefetch: int = 2,
                 start_method: str = "fork", augment: Optional[Augment] = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.shuffle, self.flip = bool(shuffle), bool(flip)
        self.augment = augment
        self.prefetch = max(1, int(prefetch))
        self.start_method = start_method
        self.epoch = 0
        self._pool = None
        self._finalizer = None
        if len(self) == 0:
            raise ValueError(f"dataset of {len(dataset)} images is smaller than one global batch "
                             f"({self.batch_size} x {self.world_size} ranks)")

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Iterate over ``epoch``'s batches from ``start_batch`` on (a resumed run skips the ones it
        already trained on without decoding them)."""
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def __len__(self) -> int:
        return len(self.dataset) // (self.batch_size * self.world_size)

    def shard_plan(self, epoch: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
        """(indices [len, B], flips [len, B]) that this rank reads in ``epoch`` (default: current)."""
        epoch = self.epoch if epoch is None else epoch
        order, coins = epoch_plan(len(self.dataset), epoch, self.seed, self.shuffle, self.flip)
        global_batch = self.batch_size * self.world_size
        used = order[:len(self) * global_batch].reshape(len(self), self.world_size, self.batch_size)
        indices = used[:, self.rank]
        return indices, coins[indices]

    def __iter__(self) -> Iterator[Batch]:
        indices, flips = self.shard_plan()
        start = getattr(self, "start_batch", 0)
        indices, flips = indices[start:], flips[start:]
        stream = (self.seed, self.epoch)
        if self.num_workers == 0:
            for batch_indices, batch_flips in zip(indices, flips):
                images, labels = load_batch(self.dataset, batch_indices, batch_flips, self.augment, stream)
                yield normalize(images), labels
            return
        pool = self._get_pool()
        pending = collections.deque()
        tasks = ((i, f, stream) for i, f in zip(indices, flips))
        window = self.num_workers * self.prefetch
        # A bounded window of outstanding batches: Pool.imap would queue the whole epoch and buffer
        # results without limit if training is slower than decoding.
        for task in tasks:
            pending.append(pool.apply_async(_worker_load_batch, task))
            if len(pending) >= window:
                break
        while pending:
            images, labels = pending.popleft().get()
            task = next(tasks, None)
            if task is not None:
                pending.append(pool.apply_async(_worker_load_batch, task))
            yield normalize(images), labels

    def _get_pool(self) -> multiprocessing.pool.Pool:
        if self._pool is None:
            context = multiprocessing.get_context(self.start_method)
            self._pool = context.Pool(self.num_workers, initializer=_init_worker,
                                      initargs=(self.dataset, self.augment))
            # Terminate the workers when the loader is garbage-collected or the interpreter exits.
            self._finalizer = weakref.finalize(self, self._pool.terminate)
        return self._pool

    def close(self) -> None:
        """Stop the worker processes (a later iteration starts new ones)."""
        if self._finalizer is not None:
            self._finalizer()
        self._pool, self._finalizer = None, None

    def __enter__(self) -> "ShardedLoader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_pool"] = state["_finalizer"] = None
        return state
