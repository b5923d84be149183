"""One training checkpoint: `save(path, state)` and `load(path) -> CheckpointState`, as one file
`ckpt-<step>.npz` or, with Global.checkpoint_format sharded, a folder `ckpt-<step>/`
(of_face/run/shards.py). Which checkpoints a run folder holds, which one a resume takes and
rotation are the RunFolder's (of_face/run/folder.py); what a TrainingSystem puts into a
checkpoint and takes back is the trainer's (of_face/train/snapshot.py). The backbone alone
(`backbone.npz`) is `of_face.models.weights`.

`ckpt-<step:08d>.npz` holds everything a run needs to continue:

  __step__                      int64: optimizer steps done (also read by `of-face info`)
  __meta__                      uint8: UTF-8 JSON — format, step, run id, epoch/batch position, world
                                size, batch plan, classes, config, mode, eager optimizer step count
                                and LR-scheduler state, RNG states
  model/backbone.<name>         backbone parameters and buffers (broadcast: rank 0's copy is the whole)
  model/head.weight             FC weight [num_classes, dim], gathered, *without* padding rows
  opt/<param>/<slot>            optimizer state per parameter, slot in eager names (momentum_buf,
                                exp_avg, exp_avg_sq); the FC's slots gathered and unpadded like it
  graph/<var>                   other nn.Graph variables: System-Train-TrainStep (drives the in-graph
                                LR schedule and AdamW bias correction), AMP's LossScale and
                                GoodStepCounter ("{graph}" stands for the graph's own name)
  replica/<key>                 [world, ...] every rank's copy of a replicated tensor whose copies differ
  rng/<name>                    host RNG states (OneFlow default generators, numpy)

Written by rank 0 to `.ckpt-<step>.npz.tmp<pid>`, fsync'ed, renamed: never an incomplete `ckpt-*`.
"""
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from of_face import parallel
from of_face.config import ConfigError
from of_face.io import atomic_write
from of_face.run import shards

CKPT_FORMAT = 1
CKPT_RE = re.compile(r"^ckpt-(\d{8})(\.npz)?$")  # a file, or a sharded checkpoint's folder
HEAD_WEIGHT = "head.weight"
FC_WEIGHT = f"model/{HEAD_WEIGHT}"


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used: unreadable, cut short, or for another model/data set."""


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint could not be written (disk full, I/O error) on some rank; raised on every rank."""


def checkpoint_name(step: int, sharded: bool = False) -> str:
    return f"ckpt-{int(step):08d}" + ("" if sharded else ".npz")


def is_training_checkpoint(path: str) -> bool:
    """A `ckpt-*` training checkpoint (as opposed to a backbone.npz)."""
    return bool(CKPT_RE.match(os.path.basename(os.path.normpath(path))))


def is_fc_key(key: str) -> bool:
    """The keys whose rows are classes: the FC weight and its optimizer slots."""
    return key == FC_WEIGHT or key.startswith(f"opt/{HEAD_WEIGHT}/")


@dataclass
class CheckpointState:
    """One checkpoint's content, in the key layout above.

    Saving: `arrays` holds rank 0's entries (other ranks' are not written); in the one-file
    format the FC keys are among them, whole and unpadded. Sharded, `own_rows` gives per FC key
    this rank's own real rows (called when written: one key's host copy at a time) and
    `shard_ranges` every rank's [start, stop) of the classes.
    Loaded: `arrays` holds every entry but the FC rows, which `read_rows` reads by row range
    whatever the format; `fc_keys` names them and `fc_shape` is the FC weight's [classes, dim]."""
    meta: dict
    arrays: Dict[str, Optional[np.ndarray]] = field(default_factory=dict)
    own_rows: Dict[str, Callable[[], np.ndarray]] = field(default_factory=dict)
    shard_ranges: List[Tuple[int, int]] = field(default_factory=list)
    fc_keys: List[str] = field(default_factory=list)
    fc_shape: Optional[Tuple[int, int]] = None
    reader: Optional[Callable[[str, int, int, np.ndarray], None]] = None

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def sharded(self) -> bool:
        return self.meta.get("checkpoint_format") == "sharded"

    def read_rows(self, key: str, start: int, stop: int, out: np.ndarray) -> None:
        """The stored rows [start, stop) of FC key `key` into `out` (stop <= the stored classes)."""
        self.reader(key, start, stop, out)


def _write_npz(path: str, arrays: Dict[str, np.ndarray]) -> None:
    """Write `arrays` to `path` atomically (of_face.io: a synced temporary, then a rename)."""
    with atomic_write(path) as fh:
        np.savez(fh, **arrays)


def save(path: str, state: CheckpointState) -> None:
    """Write `state` to `path` (one file by rank 0, or sharded: every rank its rows); collective.

    A write that fails on any rank (disk full, I/O error) raises CheckpointWriteError on every
    rank naming the file and the first failing rank's error; nothing incomplete is named ckpt-*."""
    rank, sharded = parallel.rank(), state.sharded
    arrays = dict(state.arrays)
    if rank == 0:
        arrays["__step__"] = np.int64(state.step)
        arrays["__meta__"] = np.frombuffer(json.dumps(state.meta).encode(), np.uint8)
    error, tmp = None, None
    if sharded:
        tmp = shards.begin(path, rank) if rank == 0 else shards.partial_dir(path)
        parallel.barrier()  # the partial folder exists before any rank writes into it
    try:
        if sharded:
            for key, own in state.own_rows.items():
                shards.write_rows(tmp, key, rank, own())
            if rank == 0:
                shards.write_main(tmp, arrays)
        elif rank == 0:
            _write_npz(path, arrays)
    except OSError as e:  # disk full, quota, I/O error: the temporary is gone, the old files intact
        error = e
    _agree(error, path, tmp)
    if sharded:  # every rank's rows are on disk: the manifest and the rename make the set whole
        try:
            if rank == 0:
                shards.finish(path, tmp, state.meta, sorted(state.own_rows), state.shard_ranges)
        except OSError as e:
            error = e
        _agree(error, path, tmp)


def _agree(error: Optional[OSError], path: str, partial: Optional[str] = None) -> None:
    """Every rank learns every rank's write outcome (one collective: errno, 0 = written), so a
    failed write stops all of them instead of leaving the others waiting in the next step."""
    codes = parallel.all_gather_int(0 if error is None else (error.errno or -1))
    if not codes.any():
        return
    if partial:  # a sharded save's folder: never becomes a checkpoint
        if parallel.rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
        # no rank raises before it is gone: a rank that exits first has the launcher kill the
        # others, rank 0 in the middle of the removal (seen once ranks were pinned to their CPUs)
        parallel.barrier()
    r = int(np.flatnonzero(codes)[0])
    why = (os.strerror(codes[r]) if codes[r] > 0 else "write error") + (f" on rank {r}" if r else "")
    raise CheckpointWriteError(f"could not write checkpoint {path} ({why})")


def _open(path: str):
    """np.load of the file, or of a sharded checkpoint's main.npz (CheckpointError if incomplete)."""
    if shards.is_sharded(path):
        if shards.read_manifest(path) is None:
            raise CheckpointError(f"{path}: incomplete sharded checkpoint (no {shards.MANIFEST})")
        return shards.open_main(path)
    return np.load(path)


def _unreadable(path: str, e: Exception) -> CheckpointError:
    return CheckpointError(f"{path}: unreadable or truncated checkpoint ({type(e).__name__}: {e})")


def read_meta(path: str) -> dict:
    """The JSON metadata of a checkpoint (cheap: reads one member); CheckpointError if unreadable."""
    if not os.path.exists(path):
        raise CheckpointError(f"Global.resume: checkpoint not found: {path}")
    try:
        with _open(path) as f:
            if "__meta__" not in f.files:
                raise CheckpointError(f"{path}: not an of_face training checkpoint (no __meta__ entry)")
            meta = json.loads(bytes(f["__meta__"]).decode())
    except CheckpointError:
        raise
    except Exception as e:  # BadZipFile, EOFError, ValueError of a file cut short or foreign
        raise _unreadable(path, e) from None
    if meta.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')}, this version reads {CKPT_FORMAT}")
    return meta


def read_backbone(path: str) -> Tuple[dict, dict]:
    """({name: numpy} of the backbone, meta) of a training checkpoint: what export and eval need."""
    meta = read_meta(path)
    prefix = "model/backbone."
    try:
        with _open(path) as f:
            state = {k[len(prefix):]: f[k] for k in f.files if k.startswith(prefix)}
    except Exception as e:
        raise _unreadable(path, e) from None
    return state, meta


def load(path: str) -> CheckpointState:
    """A checkpoint's metadata and entries; a sharded one's FC rows are read later, by range."""
    meta = read_meta(path)
    try:
        with _open(path) as f:  # a sharded checkpoint's main.npz holds no FC rows
            data = {k: f[k] for k in f.files}
    except Exception as e:
        raise _unreadable(path, e) from None
    manifest = shards.read_manifest(path) if shards.is_sharded(path) else None
    if manifest:
        fc_keys = sorted(manifest["shards"])
        fc_shape = (int(manifest["num_classes"]), int(meta["embedding_size"]))

        def reader(key, start, stop, out):
            shards.read_rows(path, manifest, key, start, stop, out)
    else:
        fc_keys = [k for k in data if is_fc_key(k)]
        rows = {k: data.pop(k) for k in fc_keys}
        fc_shape = tuple(rows[FC_WEIGHT].shape) if FC_WEIGHT in rows else None

        def reader(key, start, stop, out):
            out[...] = rows[key][start:stop]
    return CheckpointState(meta, data, fc_keys=fc_keys, fc_shape=fc_shape, reader=reader)
