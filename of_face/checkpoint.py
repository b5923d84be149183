"""Training checkpoints `ckpt-<step>.npz` (layout below) and the run folder's lifecycle (which
checkpoints exist, which one a resume takes, stale temporaries, rotation). Written by rank 0 to
a temporary name, then renamed: a crash mid-write leaves the previous file intact. The backbone
alone (`backbone.npz`, for export and fine-tuning) is `of_face.models.weights`.

`system` below is a `TrainingSystem` (of_face/train/system.py, which imports this module): its
backbone, head and optimizer, and its stepper's mode-independent `state_dict()`.
"""
import json
import os
import re
from typing import Callable, List, Optional, Tuple

import numpy as np
import oneflow as flow

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
#   __meta__                      uint8: UTF-8 JSON — format, step, epoch/batch position in the epoch,
#                                 samples seen, world size, global batch, classes, the run's config,
#                                 mode, eager optimizer step count and LR-scheduler state, RNG states
#   model/backbone.<name>         backbone parameters and buffers (broadcast: rank 0's copy is the whole)
#   model/head.weight             FC weight [num_classes, dim], gathered, *without* padding rows
#   opt/<param>/<slot>            optimizer state per parameter, slot in eager names (momentum_buf,
#                                 exp_avg, exp_avg_sq); the FC's slots gathered and unpadded like it
#   graph/<var>                   other nn.Graph variables: System-Train-TrainStep (drives the in-graph
#                                 LR schedule and AdamW bias correction), AMP's LossScale and
#                                 GoodStepCounter ("{graph}" stands for the graph's own name)
#   rng/<name>                    host RNG states (OneFlow default generators, numpy)
#
# Written by rank 0 to `.ckpt-<step>.npz.tmp<pid>`, fsync'ed, then renamed: a crash mid-write
# leaves the previous checkpoints intact and never a file under a `ckpt-*` name that is
# incomplete. Loading pads the FC rows to the new world's padded class count and splits them
# along classes, so a checkpoint resumes on any number of ranks.


CKPT_FORMAT = 1
CKPT_RE = re.compile(r"^ckpt-(\d{8})\.npz$")
HEAD_WEIGHT = "head.weight"


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used: unreadable, cut short, or for another model/data set."""


def checkpoint_name(step: int) -> str:
    return f"ckpt-{int(step):08d}.npz"


def list_checkpoints(out_dir: str) -> List[Tuple[int, str]]:
    """[(step, path)] of the `ckpt-*.npz` files in out_dir, oldest first."""
    if not os.path.isdir(out_dir):
        return []
    found = [(int(m.group(1)), os.path.join(out_dir, n)) for n in os.listdir(out_dir) if (m := CKPT_RE.match(n))]
    return sorted(found)


def read_meta(path: str) -> dict:
    """The JSON metadata of a checkpoint (cheap: reads one member); CheckpointError if unreadable."""
    if not os.path.isfile(path):
        raise CheckpointError(f"Global.resume: checkpoint not found: {path}")
    try:
        with np.load(path) as f:
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
    if os.path.isdir(value):
        path = latest_checkpoint(value, log)
        if path is None:
            raise CheckpointError(f"Global.resume: no readable ckpt-*.npz checkpoint in {value}")
        return path
    if not os.path.isfile(value):
        raise CheckpointError(f"Global.resume: checkpoint not found: {value}")
    return value


def remove_stale_temporaries(out_dir: str) -> List[str]:
    """Delete temp files a killed run left behind (of_face.io's `.<name>.tmp<pid>` scheme, which
    every atomic writer uses); rank 0 only. Returns their names."""
    if parallel.rank() != 0:
        return []
    return io.remove_stale_temporaries(out_dir)


# ----------------------------------------------------------------- save / load


def _fc_rows(key):
    return key == f"model/{HEAD_WEIGHT}" or key.startswith(f"opt/{HEAD_WEIGHT}/")


def _pad_rows(array, rows):
    if array.shape[0] == rows:
        return array
    pad = np.zeros((rows - array.shape[0],) + array.shape[1:], array.dtype)
    return np.concatenate([array, pad])


def save_checkpoint(out_dir: str, step: int, system, meta: dict, keep: int = 0) -> str:
    """Write ckpt-<step>.npz for a `TrainingSystem` (collective: every rank calls it; rank 0
    writes). Returns its path.

    `meta`: the trainer's JSON-able position (epoch, batch in epoch, batch plan, ...) and config.
    `keep` > 0 deletes all but the newest `keep` checkpoints afterwards."""
    # Wait for every queued step (graph or eager) before reading parameters and optimizer state,
    # as nn.Graph.state_dict() itself does.
    flow._oneflow_internal.eager.Sync()
    backbone, head = system.backbone, system.head
    state = system.step.state_dict()
    sources = {f"model/backbone.{k}": v for k, v in backbone.state_dict().items()}
    sources[f"model/{HEAD_WEIGHT}"] = head.weight
    sources.update({f"opt/{param}/{slot}": t for (param, slot), t in state.slots.items()})
    sources.update({f"graph/{name}": t for name, t in state.variables.items()})
    rows = head.num_classes
    arrays = {}
    for key, t in sources.items():
        a = t if isinstance(t, np.ndarray) else parallel.to_rank0_numpy(t)
        arrays[key] = a[:rows] if a is not None and _fc_rows(key) else a
    replicas = parallel.divergent_replicas({k: t for k, t in sources.items() if not isinstance(t, np.ndarray)})
    arrays.update({f"replica/{k}": a for k, a in replicas.items()})
    eager = state.scheduler is not None
    rng, rng_meta = rng_states()
    meta = dict(meta, format=CKPT_FORMAT, step=int(step), world_size=parallel.world_size(),
                num_classes=int(head.num_classes), embedding_size=int(head.weight.shape[1]),
                optimizer=type(system.optimizer).__name__,
                optimizer_step=int(state.variables[TRAIN_STEP_VAR][0]) if eager else None,
                scheduler=_jsonable(state.scheduler) if eager else None, rng=rng_meta)
    path = os.path.join(out_dir, checkpoint_name(step))
    if parallel.rank() == 0:
        arrays.update(rng)
        arrays["__step__"] = np.int64(step)
        arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
        _write_npz(path, arrays)
        if keep > 0:
            for _, old in list_checkpoints(out_dir)[:-keep]:
                os.remove(old)
    parallel.barrier()
    return path


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    return obj


def load_checkpoint(path: str, system) -> dict:
    """Restore a checkpoint into a freshly built `TrainingSystem` (before its first step).

    Works across world sizes: the FC weight and its optimizer state are padded to this world's
    padded class count and split along classes. Returns the checkpoint's metadata."""
    meta = read_meta(path)
    try:
        f = np.load(path)
        data = {k: f[k] for k in f.files}
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable or truncated checkpoint ({type(e).__name__}: {e})") from None
    backbone, head = system.backbone, system.head
    _check_model(path, data, meta, backbone, head)
    replicas = [k for k in data if k.startswith("replica/")]
    if replicas and meta.get("world_size") == parallel.world_size():
        for k in replicas:  # the same world: every rank gets back its own copy (parallel.divergent_replicas)
            data[k[len("replica/"):]] = data[k][parallel.rank()]
    meta["divergent_replicas"] = len(replicas)
    with flow.no_grad():
        for k, v in backbone.state_dict().items():
            parallel.load_into(v, data[f"model/backbone.{k}"])
        head.weight.copy_(parallel.place_like(_pad_rows(data[f"model/{HEAD_WEIGHT}"], head.weight.shape[0]),
                                              head.weight))
    named = named_parameters(backbone, head)
    wanted = OPTIMIZER_SLOTS.get(type(system.optimizer).__name__, ())
    state = StepperState(step=int(meta["step"]))
    for key, value in data.items():
        if key.startswith("opt/"):
            param, slot = key[4:].rsplit("/", 1)
            if param in named and slot in wanted:
                ref = named[param]
                value = _pad_rows(value, ref.shape[0]) if param == HEAD_WEIGHT else value
                state.slots[(param, slot)] = parallel.place_like(value, ref)
        elif key.startswith("graph/"):
            state.variables[key[6:]] = value
    system.step.load_state_dict(state)
    set_rng_states(data, meta)
    return meta


def _check_model(path, data, meta, backbone, head):
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
    fc = data.get(f"model/{HEAD_WEIGHT}")
    if fc is None:
        raise CheckpointError(f"{path}: no FC weight ({HEAD_WEIGHT}) in the checkpoint")
    if fc.shape != (head.num_classes, head.weight.shape[1]):
        raise CheckpointError(
            f"{path}: FC weight is [{fc.shape[0]} classes, {fc.shape[1]}] but this run has "
            f"[{head.num_classes} classes (Loss.num_classes / the data set), {head.weight.shape[1]}]")
