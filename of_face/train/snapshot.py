"""What a training checkpoint holds of a `TrainingSystem` (of_face/train/system.py), and putting
it back: the trainer's side of of_face/run/checkpoint.py, which only writes and reads one.

`capture(system, meta)` gathers the backbone, the FC rows (whole on rank 0, or each rank its own
for the sharded format), the stepper's `state_dict()`, replicas that differ between ranks and
the host RNG states into a `CheckpointState`; `restore(state, system, path)` checks that the
checkpoint fits this model and puts everything back, across world sizes: the FC rows and their
optimizer state are read by this rank's range of the new world's padded classes (FCTable).
"""
import json
from functools import partial
from typing import Optional

import numpy as np
import oneflow as flow

from of_face import parallel
from of_face.heads import fc_table
from of_face.heads.fc_table import FCTable
from of_face.models.weights import state_mismatch
from of_face.run import checkpoint
from of_face.run.changes import CLASS_COUNT
from of_face.run.folder import RunFolder
from of_face.run.checkpoint import FC_WEIGHT, HEAD_WEIGHT, CheckpointError, CheckpointState, is_fc_key
from of_face.oneflow_compat import sync
from of_face.train.rng import rng_states, set_rng_states
from of_face.train.steps import OPTIMIZER_SLOTS, TRAIN_STEP_VAR, StepperState, named_parameters


def capture(system, step: int, meta: dict) -> CheckpointState:
    """The checkpoint of `system` after optimizer step `step`; collective. `meta`: the trainer's JSON-able position
    (epoch, batch in epoch, batch plan, run id, checkpoint_format, ...) and config."""
    sync()  # every queued step done (as nn.Graph.state_dict() does)
    backbone, head = system.backbone, system.head
    state = system.step.state_dict()
    sources = {f"model/backbone.{k}": v for k, v in backbone.state_dict().items()}
    sources[FC_WEIGHT] = head.weight
    sources.update({f"opt/{param}/{slot}": t for (param, slot), t in state.slots.items()})
    sources.update({f"graph/{name}": t for name, t in state.variables.items()})
    table = FCTable.of(head.num_classes)
    rows, world, rank = table.num_classes, table.world, parallel.rank()
    sharded = meta.get("checkpoint_format") == "sharded"
    own = table.row_range(rank)
    arrays, local = {}, {}
    for key, t in sources.items():
        if sharded and is_fc_key(key):  # this rank's own real rows, read when written (a view on CPU)
            local[key] = partial(lambda t: fc_table.local_rows(t).numpy()[:own[1] - own[0]], t)
            continue
        if isinstance(t, np.ndarray):
            a = t
        else:
            a = fc_table.rows_rank0(t) if is_fc_key(key) else parallel.to_rank0_numpy(t)
        arrays[key] = a[:rows] if a is not None and is_fc_key(key) else a
    replicas = parallel.divergent_replicas({k: t for k, t in sources.items() if not isinstance(t, np.ndarray)})
    arrays.update({f"replica/{k}": a for k, a in replicas.items()})
    eager = state.scheduler is not None
    rng, rng_meta = rng_states()
    meta = dict(meta, format=checkpoint.CKPT_FORMAT, step=int(step), world_size=world,
                num_classes=int(rows), embedding_size=int(head.embedding_size),
                optimizer=type(system.optimizer).__name__,
                optimizer_step=int(state.variables[TRAIN_STEP_VAR][0]) if eager else None,
                scheduler=_jsonable(state.scheduler) if eager else None, rng=rng_meta)
    if rank == 0:
        arrays.update(rng)
    return CheckpointState(meta, arrays, own_rows=local, shard_ranges=table.shard_ranges())


def _jsonable(obj):  # (an LR scheduler's state: numpy scalars, tuples, int keys)
    return json.loads(json.dumps(obj, default=lambda o: o.item() if isinstance(o, (np.integer, np.floating)) else o))


def restore(state: CheckpointState, system, path: str, more_classes: bool = False) -> dict:
    """Put a checkpoint back into a freshly built `TrainingSystem` (before its first step).

    `more_classes` (Global.allow_resume_changes lists Loss.num_classes): the system may have more
    classes than the checkpoint; its rows past the checkpoint's keep their fresh initialisation
    and their optimizer state is zero. Returns the checkpoint's metadata."""
    meta, data = state.meta, dict(state.arrays)
    backbone, head = system.backbone, system.head
    _check_model(path, state, backbone, head, more_classes)
    stored, table = state.fc_shape[0], FCTable.of(head.num_classes)
    replicas = [k for k in data if k.startswith("replica/")]
    if replicas and meta.get("world_size") == parallel.world_size():
        for k in replicas:  # the same world: every rank gets back its own copy (parallel.divergent_replicas)
            data[k[len("replica/"):]] = data[k][parallel.rank()]
    meta["divergent_replicas"] = len(replicas)
    with flow.no_grad():
        for k, v in backbone.state_dict().items():
            parallel.load_into(v, data[f"model/backbone.{k}"])
        weight = table.restore(partial(state.read_rows, FC_WEIGHT), stored, head.weight, into=True)
        if weight is not None:  # (None: read into head.weight itself)
            head.weight.copy_(weight)
    named = named_parameters(backbone, head)
    wanted = OPTIMIZER_SLOTS.get(type(system.optimizer).__name__, ())
    steps = StepperState(step=int(meta["step"]))
    for key in list(data) + state.fc_keys:
        if key.startswith("opt/"):
            param, slot = key[4:].rsplit("/", 1)
            if param in named and slot in wanted:
                ref = named[param]
                steps.slots[(param, slot)] = (table.restore(partial(state.read_rows, key), stored, ref)
                                              if param == HEAD_WEIGHT else parallel.place_like(data[key], ref))
        elif key.startswith("graph/"):
            steps.variables[key[6:]] = data[key]
    system.step.load_state_dict(steps)
    set_rng_states(data, meta)
    return meta


def _check_model(path: str, state: CheckpointState, backbone, head, more_classes: bool) -> None:
    """The checkpoint must be for this backbone and this FC (class count, embedding size)."""
    data, meta, fc_shape = state.arrays, state.meta, state.fc_shape
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
    classes, dim = fc_shape
    if dim == head.embedding_size and (classes == head.num_classes or (more_classes and classes < head.num_classes)):
        return
    why = ""
    if dim == head.embedding_size and classes < head.num_classes:
        why = f"; to add classes, resume with Global.allow_resume_changes=[{CLASS_COUNT}]"
    elif dim == head.embedding_size:
        why = "; a resume cannot remove classes (their trained rows would be lost)"
    raise CheckpointError(
        f"{path}: FC weight is [{classes} classes, {dim}] but this run has "
        f"[{head.num_classes} classes (Loss.num_classes / the data set), {head.embedding_size}]{why}")


def save_checkpoint(out_dir: str, step: int, system, meta: dict, keep: int = 0,
                    last_good: Optional[str] = None) -> str:
    """capture + RunFolder.save: ckpt-<step> of `system` in out_dir (collective). Its path."""
    folder = RunFolder(out_dir)
    folder.last_good = last_good
    return folder.save(capture(system, step, meta), keep)


def load_checkpoint(path: str, system, more_classes: bool = False) -> dict:
    """Read and restore the checkpoint at `path` into `system`. Its metadata."""
    return restore(checkpoint.load(path), system, path, more_classes)
