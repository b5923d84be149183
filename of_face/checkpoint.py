"""Training checkpoints: `ckpt-<step>.npz` (layout below) or, with Global.checkpoint_format
sharded, a `ckpt-<step>/` folder (of_face/checkpoint_shards.py); which ones exist, which one a
resume takes, rotation (this run's only: of_face/run_folder.py has the rest of the run folder).
The backbone alone (`backbone.npz`) is `of_face.models.weights`. `system` below is a
`TrainingSystem` (of_face/train/system.py): backbone, head, optimizer, stepper `state_dict()`.
"""
import json
import os
import re
import shutil
from typing import Callable, List, Optional, Tuple

import numpy as np
import oneflow as flow

from of_face import checkpoint_shards as shards
from of_face import io, parallel
from of_face.config import ConfigError
from of_face.models.weights import state_mismatch
from of_face.io import atomic_write
from of_face.train.rng import rng_states, set_rng_states
from of_face.train.steps import OPTIMIZER_SLOTS, TRAIN_STEP_VAR, StepperState, named_parameters


def _write_npz(path, arrays):
    """Write `arrays` to `path` atomically (of_face.io: a synced temporary, then a rename)."""
    with atomic_write(path) as fh:
        np.savez(fh, **arrays)


# --------------------------------------------------------------------------- training checkpoints
#
# `ckpt-<step:08d>.npz` in Global.output_dir holds everything a run needs to continue:
#
#   __step__                      int64: optimizer steps done (also read by `of-face info`)
#   __meta__                      uint8: UTF-8 JSON — format, step, run id, epoch/batch position, world
#                                 size, batch plan, classes, config, mode, eager optimizer step count
#                                 and LR-scheduler state, RNG states
#   model/backbone.<name>         backbone parameters and buffers (broadcast: rank 0's copy is the whole)
#   model/head.weight             FC weight [num_classes, dim], gathered, *without* padding rows
#   opt/<param>/<slot>            optimizer state per parameter, slot in eager names (momentum_buf,
#                                 exp_avg, exp_avg_sq); the FC's slots gathered and unpadded like it
#   graph/<var>                   other nn.Graph variables: System-Train-TrainStep (drives the in-graph
#                                 LR schedule and AdamW bias correction), AMP's LossScale and
#                                 GoodStepCounter ("{graph}" stands for the graph's own name)
#   rng/<name>                    host RNG states (OneFlow default generators, numpy)
#
# Written by rank 0 to `.ckpt-<step>.npz.tmp<pid>`, fsync'ed, renamed: never an incomplete `ckpt-*`.
# Loading pads the FC rows to the new world's padded class count and splits them along classes.


CKPT_FORMAT = 1
CKPT_RE = re.compile(r"^ckpt-(\d{8})(\.npz)?$")  # a file, or a sharded checkpoint's folder
HEAD_WEIGHT = "head.weight"


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used: unreadable, cut short, or for another model/data set."""


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint could not be written (disk full, I/O error) on some rank; raised on every rank."""


def checkpoint_name(step: int, sharded: bool = False) -> str:
    return f"ckpt-{int(step):08d}" + ("" if sharded else ".npz")


def list_checkpoints(out_dir: str) -> List[Tuple[int, str]]:
    """[(step, path)] of the `ckpt-*` checkpoints (files and sharded folders) in out_dir, oldest first."""
    if not os.path.isdir(out_dir):
        return []
    found = [(int(m.group(1)), os.path.join(out_dir, n)) for n in os.listdir(out_dir) if (m := CKPT_RE.match(n))]
    return sorted(found)


def _open(path: str):
    """np.load of the file, or of a sharded checkpoint's main.npz (CheckpointError if incomplete)."""
    if shards.is_sharded(path):
        if shards.read_manifest(path) is None:
            raise CheckpointError(f"{path}: incomplete sharded checkpoint (no {shards.MANIFEST})")
        return shards.open_main(path)
    return np.load(path)


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
        raise CheckpointError(f"{path}: unreadable or truncated checkpoint ({type(e).__name__}: {e})") from None
    if meta.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')}, this version reads {CKPT_FORMAT}")
    return meta


def is_training_checkpoint(path: str) -> bool:
    """A `ckpt-*` training checkpoint (as opposed to a backbone.npz)."""
    return bool(CKPT_RE.match(os.path.basename(os.path.normpath(path))))


def read_backbone(path: str) -> Tuple[dict, dict]:
    """({name: numpy} of the backbone, meta) of a training checkpoint: what export and eval need."""
    meta = read_meta(path)
    prefix = "model/backbone."
    try:
        with _open(path) as f:
            state = {k[len(prefix):]: f[k] for k in f.files if k.startswith(prefix)}
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable or truncated checkpoint ({type(e).__name__}: {e})") from None
    return state, meta


def latest_checkpoint(out_dir: str, log: Optional[Callable[[str], None]] = None) -> Optional[str]:
    """Newest readable checkpoint in out_dir, or None; unreadable newer ones are reported and skipped."""
    for _, path in reversed(list_checkpoints(out_dir)):
        try:
            read_meta(path)
            return path
        except CheckpointError as e:
            if log:
                log(f"warning: skipping {e}")
    return None


def resolve_resume(value: Optional[str], out_dir: str,
                   log: Optional[Callable[[str], None]] = None) -> Optional[str]:
    """Global.resume -> checkpoint path or None. 'auto': newest complete one in out_dir (None if
    there is none); a folder: its newest; a file: that file (it must exist)."""
    if value in (None, "", "none", "false", "no"):
        return None
    if value == "auto":
        return latest_checkpoint(out_dir, log)
    if os.path.isdir(value) and not is_training_checkpoint(value):
        path = latest_checkpoint(value, log)
        if path is None:
            raise CheckpointError(f"Global.resume: no readable ckpt-*.npz checkpoint in {value}")
        return path
    if not os.path.exists(value):
        raise CheckpointError(f"Global.resume: checkpoint not found: {value}")
    return value


def lineage(out_dir: str) -> List[Tuple[str, str]]:
    """[(path, run id)] of the readable checkpoints in out_dir, oldest first ("legacy": before run ids)."""
    found = []
    for _, path in list_checkpoints(out_dir):
        try:
            found.append((path, read_meta(path).get("run_id") or "legacy"))
        except CheckpointError:
            pass
    return found


def rotate(out_dir: str, keep: int, run_id: str) -> List[str]:
    """Delete all but the newest `keep` checkpoints *of this run* (another run's are never touched)."""
    mine = [p for p, rid in lineage(out_dir) if rid == run_id]
    for old in mine[:-keep]:
        shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)
    return mine[:-keep]


def remove_stale_temporaries(out_dir: str) -> List[str]:
    """Delete temp files a killed run left behind (of_face.io's `.<name>.tmp<pid>` scheme, which
    every atomic writer uses); rank 0 only. Returns their names."""
    if parallel.rank() != 0:
        return []
    return shards.remove_partials(out_dir) + io.remove_stale_temporaries(out_dir, only_dead=True)


# ----------------------------------------------------------------- save / load


def _fc_rows(key):  # the keys split along classes
    return key == f"model/{HEAD_WEIGHT}" or key.startswith(f"opt/{HEAD_WEIGHT}/")


def _pad_rows(array, rows):
    return array if array.shape[0] == rows else np.concatenate(
        [array, np.zeros((rows - array.shape[0],) + array.shape[1:], array.dtype)])


def save_checkpoint(out_dir: str, step: int, system, meta: dict, keep: int = 0,
                    last_good: Optional[str] = None) -> str:
    """Write ckpt-<step>.npz (rank 0) or, with meta["checkpoint_format"] "sharded", ckpt-<step>/
    (every rank) for a `TrainingSystem`; collective. Returns its path. `meta`: the trainer's
    JSON-able position (epoch, batch in epoch, batch plan, run id, ...) and config.
    `keep` > 0 deletes all but the newest `keep` checkpoints of this run (meta["run_id"]) afterwards.
    A failed write raises CheckpointWriteError on every rank naming the file and `last_good`."""
    flow._oneflow_internal.eager.Sync()  # every queued step done (as nn.Graph.state_dict() does)
    backbone, head = system.backbone, system.head
    state = system.step.state_dict()
    sources = {f"model/backbone.{k}": v for k, v in backbone.state_dict().items()}
    sources[f"model/{HEAD_WEIGHT}"] = head.weight
    sources.update({f"opt/{param}/{slot}": t for (param, slot), t in state.slots.items()})
    sources.update({f"graph/{name}": t for name, t in state.variables.items()})
    rows, world, rank = head.num_classes, parallel.world_size(), parallel.rank()
    sharded = meta.get("checkpoint_format") == "sharded"
    own = shards.row_range(rank, world, parallel.fc_num_rows(head.weight), rows)
    arrays, local = {}, {}
    for key, t in sources.items():
        if sharded and _fc_rows(key):  # this rank's own real rows (read when written), never the whole
            local[key] = t
            continue
        if isinstance(t, np.ndarray):
            a = t
        else:
            a = parallel.fc_rows_rank0(t) if _fc_rows(key) else parallel.to_rank0_numpy(t)
        arrays[key] = a[:rows] if a is not None and _fc_rows(key) else a
    replicas = parallel.divergent_replicas({k: t for k, t in sources.items() if not isinstance(t, np.ndarray)})
    arrays.update({f"replica/{k}": a for k, a in replicas.items()})
    eager = state.scheduler is not None
    rng, rng_meta = rng_states()
    meta = dict(meta, format=CKPT_FORMAT, step=int(step), world_size=world,
                num_classes=int(rows), embedding_size=int(head.embedding_size),
                optimizer=type(system.optimizer).__name__,
                optimizer_step=int(state.variables[TRAIN_STEP_VAR][0]) if eager else None,
                scheduler=_jsonable(state.scheduler) if eager else None, rng=rng_meta)
    path = os.path.join(out_dir, checkpoint_name(step, sharded))
    if rank == 0:
        arrays.update(rng)
        arrays["__step__"] = np.int64(step)
        arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    error = None
    if sharded:
        tmp = shards.begin(path, rank) if rank == 0 else shards.partial_dir(path)
        parallel.barrier()  # the partial folder exists before any rank writes into it
    try:
        if sharded:
            for key, t in local.items():  # one key's host copy at a time (a view on CPU)
                shards.write_rows(tmp, key, rank, parallel.fc_local_rows(t).numpy()[:own[1] - own[0]])
            if rank == 0:
                shards.write_main(tmp, arrays)
        elif rank == 0:
            _write_npz(path, arrays)
    except OSError as e:  # disk full, quota, I/O error: the temporary is gone, the old files intact
        error = e
    _agree(error, path, last_good, tmp if sharded else None)
    if sharded:  # every rank's rows are on disk: the manifest and the rename make the set whole
        try:
            if rank == 0:
                shards.finish(path, tmp, meta, sorted(local), world, parallel.fc_num_rows(head.weight), rows)
        except OSError as e:
            error = e
        _agree(error, path, last_good, tmp)
    if rank == 0 and keep > 0:
        rotate(out_dir, keep, meta.get("run_id") or "legacy")
    parallel.barrier()
    return path


def _agree(error: Optional[OSError], path: str, last_good: Optional[str], partial: Optional[str] = None) -> None:
    """Every rank learns every rank's write outcome (one collective: errno, 0 = written), so a
    failed write stops all of them instead of leaving the others waiting in the next step. Rank 0
    names the file, the first failing rank's error and the last good checkpoint."""
    codes = parallel.all_gather_int(0 if error is None else (error.errno or -1))
    if not codes.any():
        return
    if partial and parallel.rank() == 0:  # a sharded save's folder: never becomes a checkpoint
        shutil.rmtree(partial, ignore_errors=True)
    r = int(np.flatnonzero(codes)[0])
    why = (os.strerror(codes[r]) if codes[r] > 0 else "write error") + (f" on rank {r}" if r else "")
    raise CheckpointWriteError(f"could not write checkpoint {path} ({why}); the run stops. Last good checkpoint: "
                               f"{last_good or 'none (no checkpoint was saved)'}; free some space and resume with "
                               "Global.resume=auto")


def _jsonable(obj):  # (an LR scheduler's state: numpy scalars, tuples, int keys)
    return json.loads(json.dumps(obj, default=lambda o: o.item() if isinstance(o, (np.integer, np.floating)) else o))


def load_checkpoint(path: str, system) -> dict:
    """Restore a checkpoint into a freshly built `TrainingSystem` (before its first step).

    Works across world sizes: the FC weight and its optimizer state are padded to this world's
    padded class count and split along classes. Returns the checkpoint's metadata."""
    meta = read_meta(path)
    try:
        with _open(path) as f:  # a sharded checkpoint's main.npz holds no FC rows
            data = {k: f[k] for k in f.files}
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable or truncated checkpoint ({type(e).__name__}: {e})") from None
    backbone, head = system.backbone, system.head
    manifest = shards.read_manifest(path) if shards.is_sharded(path) else None
    fc_keys = sorted(manifest["shards"]) if manifest else [k for k in data if _fc_rows(k)]
    fc_shape = ((manifest["num_classes"], meta["embedding_size"]) if manifest
                else getattr(data.get(f"model/{HEAD_WEIGHT}"), "shape", None))
    _check_model(path, data, meta, backbone, head, fc_shape)

    def own_rows(key, ref, in_place=False):  # this rank's slice of the new world's padded rows, placed like `ref`
        if manifest:
            return shards.load_rows(path, manifest, key, ref, in_place)
        padded = parallel.fc_num_rows(ref)
        n = padded // parallel.world_size()
        return parallel.place_local_like(_pad_rows(data[key], padded)[parallel.rank() * n:][:n], ref)
    replicas = [k for k in data if k.startswith("replica/")]
    if replicas and meta.get("world_size") == parallel.world_size():
        for k in replicas:  # the same world: every rank gets back its own copy (parallel.divergent_replicas)
            data[k[len("replica/"):]] = data[k][parallel.rank()]
    meta["divergent_replicas"] = len(replicas)
    with flow.no_grad():
        for k, v in backbone.state_dict().items():
            parallel.load_into(v, data[f"model/backbone.{k}"])
        weight = own_rows(f"model/{HEAD_WEIGHT}", head.weight, in_place=True)
        if weight is not None:  # (None: read into head.weight itself)
            head.weight.copy_(weight)
    named = named_parameters(backbone, head)
    wanted = OPTIMIZER_SLOTS.get(type(system.optimizer).__name__, ())
    state = StepperState(step=int(meta["step"]))
    for key in list(data) + [k for k in fc_keys if k not in data]:
        value = data.get(key)
        if key.startswith("opt/"):
            param, slot = key[4:].rsplit("/", 1)
            if param in named and slot in wanted:
                ref = named[param]
                state.slots[(param, slot)] = (own_rows(key, ref) if param == HEAD_WEIGHT
                                              else parallel.place_like(value, ref))
        elif key.startswith("graph/"):
            state.variables[key[6:]] = value
    system.step.load_state_dict(state)
    set_rng_states(data, meta)
    return meta


def _check_model(path, data, meta, backbone, head, fc_shape):
    """The checkpoint must be for this backbone and this FC (class count, embedding size)."""
    own = {f"model/backbone.{k}": tuple(v.shape) for k, v in backbone.state_dict().items()}
    saved = {k: tuple(v.shape) for k, v in data.items() if k.startswith("model/backbone.")}
    missing, extra, wrong = state_mismatch(own, saved)
    wrong = [f"{k[6:]} {saved[k]} vs {own[k]}" for k in wrong]
    if missing or extra or wrong:
        model = meta.get("config", {}).get("Model", {})
        raise CheckpointError(
            f"{path}: checkpoint is for another backbone (saved Model.name={model.get('name')}, "
            f"layers={model.get('layers')}, width={model.get('width')}, "
            f"embedding_size={model.get('embedding_size')}): missing {[k[6:] for k in missing[:3]]}, "
            f"unexpected {[k[6:] for k in extra[:3]]}, shape mismatch {wrong[:3]}")
    if fc_shape is None:
        raise CheckpointError(f"{path}: no FC weight ({HEAD_WEIGHT}) in the checkpoint")
    if tuple(fc_shape) != (head.num_classes, head.embedding_size):
        raise CheckpointError(
            f"{path}: FC weight is [{fc_shape[0]} classes, {fc_shape[1]}] but this run has "
            f"[{head.num_classes} classes (Loss.num_classes / the data set), {head.embedding_size}]")
