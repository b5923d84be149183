"""Checkpoints: `backbone.npz` (the backbone alone, for export and fine-tuning) and the full
training checkpoints `ckpt-<step>.npz` (layout below). Both are written by rank 0 to a temporary
name, then renamed: a crash mid-write leaves the previous file intact.
"""
import json
import os
import random
import re
import zlib

import numpy as np
import oneflow as flow

from of_face import parallel
from of_face.config import ConfigError

BACKBONE_FILE = "backbone.npz"


def save_backbone(backbone, out_dir, step):
    path = os.path.join(out_dir, BACKBONE_FILE)
    flow._oneflow_internal.eager.Sync()  # every queued step done (as nn.Graph.state_dict() does)
    state = {k: (v.to_local() if v.is_global else v).numpy() for k, v in backbone.state_dict().items()}
    if parallel.rank() == 0:
        _write_npz(path, dict(state, __step__=np.int64(step)))
    parallel.barrier()
    return path


def _write_npz(path, arrays):
    """Write `arrays` to `path` atomically: a synced temporary `.<name>.tmp<pid>`, then a rename."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _mismatch(own, saved):
    """{name: shape} of the model and of a file -> (missing, unexpected, shape-mismatched) names."""
    missing = sorted(set(own) - set(saved))
    extra = sorted(set(saved) - set(own))
    wrong = [k for k in own if k in saved and tuple(saved[k]) != tuple(own[k])]
    return missing, extra, wrong


def load_backbone(backbone, path):
    """Load a saved backbone into a local (not yet placed) module; names a mismatch clearly."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with np.load(path) as f:
            state = {k: f[k] for k in f.files if k != "__step__"}
    except Exception as e:  # zipfile/pickle errors of a cut or foreign file
        raise ValueError(f"{path}: not a readable of_face backbone checkpoint ({e})") from None
    missing, extra, wrong = _mismatch({k: v.shape for k, v in backbone.state_dict().items()},
                                      {k: v.shape for k, v in state.items()})
    if missing or extra or wrong:
        raise ValueError(
            f"{path}: does not match the configured backbone (missing {missing[:3]}, unexpected {extra[:3]}, "
            f"shape mismatch {wrong[:3]})"
        )
    backbone.load_state_dict({k: flow.tensor(v) for k, v in state.items()})
    return backbone


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
# nn.Graph's optimizer-state suffixes <-> eager optimizer state keys
GRAPH_SLOTS = {"momentum": "momentum_buf", "m": "exp_avg", "v": "exp_avg_sq"}
EAGER_SLOTS = {v: k for k, v in GRAPH_SLOTS.items()}
OPTIMIZER_SLOTS = {"SGD": ("momentum_buf",), "AdamW": ("exp_avg", "exp_avg_sq")}
TRAIN_STEP_VAR = "System-Train-TrainStep"


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used: unreadable, cut short, or for another model/data set."""


def checkpoint_name(step):
    return f"ckpt-{int(step):08d}.npz"


def list_checkpoints(out_dir):
    """[(step, path)] of the `ckpt-*.npz` files in out_dir, oldest first."""
    if not os.path.isdir(out_dir):
        return []
    found = [(int(m.group(1)), os.path.join(out_dir, n)) for n in os.listdir(out_dir) if (m := CKPT_RE.match(n))]
    return sorted(found)


def read_meta(path):
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


def latest_checkpoint(out_dir, log=None):
    """Newest readable checkpoint in out_dir, or None; unreadable newer ones are reported and skipped."""
    for step, path in reversed(list_checkpoints(out_dir)):
        try:
            read_meta(path)
            return path
        except CheckpointError as e:
            if log:
                log(f"warning: skipping {e}")
    return None


def resolve_resume(value, out_dir, log=None):
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


def remove_stale_temporaries(out_dir):
    """Delete temp files a killed run left behind (`.ckpt-*.npz.tmp<pid>`, `.backbone.npz.tmp<pid>`,
    `config.yaml.tmp<pid>`); rank 0 only. Returns their names."""
    if parallel.rank() != 0 or not os.path.isdir(out_dir):
        return []
    removed = []
    for name in os.listdir(out_dir):
        if re.search(r"\.tmp\d+", name) and os.path.isfile(os.path.join(out_dir, name)):
            try:
                os.remove(os.path.join(out_dir, name))
                removed.append(name)
            except OSError:
                pass
    return removed


# ----------------------------------------------------------------- reading tensors out / in


def _to_rank0_numpy(t):
    """A tensor's whole value as numpy on rank 0 (None elsewhere); collective for global tensors."""
    if not t.is_global:
        return t.detach().numpy()
    if all(s == flow.sbp.broadcast for s in t.sbp):
        return t.to_local().numpy() if parallel.rank() == 0 else None
    whole = t.to_global(placement=flow.placement(t.placement.type, ranks=[0]), sbp=flow.sbp.broadcast)
    return whole.to_local().numpy() if parallel.rank() == 0 else None


def _like(array, ref):
    """numpy value -> tensor placed and split like `ref` (every rank passes the whole value).

    Class-split tensors (split(0)) keep only this rank's rows, as `parallel.fc_weight` does."""
    dtype = ref.dtype
    if not ref.is_global:
        return flow.tensor(array, dtype=dtype, device=ref.device)
    if all(s == flow.sbp.broadcast for s in ref.sbp):
        t = flow.tensor(array, dtype=dtype).to_global(placement=ref.placement, sbp=ref.sbp)
        # to_global() takes rank 0's data for every rank; a rank's own replica (see
        # _divergent_replicas) is written into its local part afterwards
        t.to_local().copy_(flow.tensor(array, dtype=dtype, device=t.to_local().device))
        return t
    ranks = list(np.asarray(ref.placement.ranks).reshape(-1))
    n = array.shape[0] // len(ranks)
    r = ranks.index(parallel.rank())
    local = np.ascontiguousarray(array[r * n:(r + 1) * n])
    return flow.tensor(local, dtype=dtype).to_global(placement=ref.placement, sbp=ref.sbp)


def _broadcast(array, placement):
    t = flow.tensor(array).to_global(placement=placement, sbp=flow.sbp.broadcast)
    t.to_local().copy_(flow.tensor(array, device=t.to_local().device))
    return t


def _pad_rows(array, rows):
    if array.shape[0] == rows:
        return array
    pad = np.zeros((rows - array.shape[0],) + array.shape[1:], array.dtype)
    return np.concatenate([array, pad])


def _named_params(backbone, head):
    named = {f"backbone.{n}": p for n, p in backbone.named_parameters()}
    named.update({f"head.{n}": p for n, p in head.named_parameters()})
    return named


def _graph(step_fn):
    return getattr(step_fn, "graph", None)


def graph_variables(step_fn):
    """nn.Graph's own variables beyond module parameters/buffers: {name: global tensor}.

    Optimizer state (`<param>-momentum`, `-m`, `-v`), the train step counter, AMP's loss scale.
    Before the graph's first call: what `load_checkpoint` handed it (or nothing)."""
    graph = _graph(step_fn)
    if graph is None:
        return {}
    return {k: v for k, v in graph.state_dict().items() if not isinstance(v, dict)}


def _optimizer_state(step_fn, optimizer, named):
    """{(param name, eager slot): tensor}, {graph var: tensor}, eager step count."""
    slots, others = {}, {}
    graph = _graph(step_fn)
    if graph is not None:
        for name, t in graph_variables(step_fn).items():
            if "FreeEagerTensor" in name:  # constants the step reads (PartialFC's pad bias): rebuilt, not state
                continue
            param, _, suffix = name.rpartition("-")
            if param in named and suffix in GRAPH_SLOTS:
                slots[(param, GRAPH_SLOTS[suffix])] = t
            else:
                others[name.replace(graph.name, "{graph}")] = t
        return slots, others, None
    by_id = {id(p): n for n, p in named.items()}
    for p, state in optimizer._state.items():
        if isinstance(p, str) or id(p) not in by_id or not isinstance(state, dict):
            continue
        for slot, t in state.items():
            if isinstance(t, flow.Tensor):
                slots[(by_id[id(p)], slot)] = t
    return slots, others, int(optimizer._state.get("step", 0))


def rng_states():
    """Host-side random states: OneFlow's default generators and numpy's global one."""
    states = {"rng/flow_cpu": flow.default_generator.get_state().numpy()}
    if flow.cuda.is_available():
        for i, s in enumerate(flow.cuda.get_rng_state_all()):
            states[f"rng/flow_cuda{i}"] = s.numpy()
    np_state = np.random.get_state()
    states["rng/numpy_keys"] = np_state[1]
    return states, {"numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
                    "python": repr(random.getstate())}


def set_rng_states(f, meta):
    if "rng/flow_cpu" in f:
        flow.default_generator.set_state(flow.tensor(f["rng/flow_cpu"]))
    if flow.cuda.is_available():
        states = [f[k] for k in sorted(k for k in f if k.startswith("rng/flow_cuda"))]
        if len(states) == flow.cuda.device_count():
            flow.cuda.set_rng_state_all([flow.tensor(s) for s in states])
    rng = meta.get("rng", {})
    if "numpy" in rng and "rng/numpy_keys" in f:
        kind, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((kind, f["rng/numpy_keys"], pos, has_gauss, cached))


# ----------------------------------------------------------------- save / load


def _replicated(t):
    return t.is_global and len(t.placement.ranks) > 1 and all(s == flow.sbp.broadcast for s in t.sbp)


def _divergent_replicas(sources):
    """{"replica/<key>": [world, ...]} for broadcast tensors whose local copies differ across ranks.

    A broadcast tensor should hold the same value on every rank, but BatchNorm on a batch split
    over ranks updates its running statistics from each rank's own samples (parameters stay
    equal: tests/test_twin.py checks it). Rank 0's copy alone would then not resume the run exactly,
    so every rank's copy of such a tensor is stored too (found by comparing CRCs; nothing
    extra is written when the replicas agree)."""
    keys = [k for k, t in sources.items() if _replicated(t)]
    if not keys:
        return {}
    place = sources[keys[0]].placement
    crcs = np.array([zlib.crc32(np.ascontiguousarray(sources[k].to_local().numpy()).tobytes()) for k in keys],
                    np.int64)
    table = flow.tensor(crcs[None]).to_global(placement=place, sbp=flow.sbp.split(0))
    table = parallel.to_numpy(table)  # [world, len(keys)]
    out = {}
    for i, k in enumerate(keys):
        if (table[:, i] != table[0, i]).any():
            local = sources[k].to_local()
            stacked = local.unsqueeze(0).to_global(placement=sources[k].placement, sbp=flow.sbp.split(0))
            a = _to_rank0_numpy(stacked)
            out[f"replica/{k}"] = a
    return out


def save_checkpoint(out_dir, step, backbone, head, optimizer, scheduler, step_fn, meta, keep=0):
    """Write ckpt-<step>.npz (collective: every rank calls it; rank 0 writes). Returns its path.

    `meta`: the trainer's JSON-able position (epoch, batch in epoch, ...) and config. `keep` > 0
    deletes all but the newest `keep` checkpoints afterwards."""
    # Wait for every queued step (graph or eager) before reading parameters and optimizer state,
    # as nn.Graph.state_dict() itself does.
    flow._oneflow_internal.eager.Sync()
    named = _named_params(backbone, head)
    sources = {f"model/backbone.{k}": v for k, v in backbone.state_dict().items()}
    sources[f"model/{HEAD_WEIGHT}"] = head.weight
    slots, others, eager_step = _optimizer_state(step_fn, optimizer, named)
    sources.update({f"opt/{param}/{slot}": t for (param, slot), t in slots.items()})
    sources.update({f"graph/{name}": t for name, t in others.items()})
    rows = head.num_classes
    arrays = {}
    for key, t in sources.items():
        a = _to_rank0_numpy(t)
        fc_rows = key in (f"model/{HEAD_WEIGHT}",) or key.startswith(f"opt/{HEAD_WEIGHT}/")
        arrays[key] = a[:rows] if a is not None and fc_rows else a
    arrays.update(_divergent_replicas(sources))
    if eager_step is not None:  # eager: the graph's step counter, so the file also resumes in graph mode
        arrays[f"graph/{TRAIN_STEP_VAR}"] = np.array([eager_step], np.int64)
    rng, rng_meta = rng_states()
    meta = dict(meta, format=CKPT_FORMAT, step=int(step), world_size=parallel.world_size(),
                num_classes=int(head.num_classes), embedding_size=int(head.weight.shape[1]),
                optimizer=type(optimizer).__name__, optimizer_step=eager_step,
                scheduler=_jsonable(scheduler.state_dict()) if eager_step is not None else None,
                rng=rng_meta)
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


def load_checkpoint(path, backbone, head, optimizer, scheduler, step_fn):
    """Restore a checkpoint into freshly built modules/optimizer/stepper (before the first step).

    Works across world sizes: the FC weight and its optimizer state are padded to this world's
    padded class count and split along classes. Returns the checkpoint's metadata."""
    meta = read_meta(path)
    try:
        f = np.load(path)
        data = {k: f[k] for k in f.files}
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable or truncated checkpoint ({type(e).__name__}: {e})") from None
    _check_model(path, data, meta, backbone, head)
    replicas = [k for k in data if k.startswith("replica/")]
    if replicas and meta.get("world_size") == parallel.world_size():
        for k in replicas:  # the same world: every rank gets back its own copy (see _divergent_replicas)
            data[k[len("replica/"):]] = data[k][parallel.rank()]
    meta["divergent_replicas"] = len(replicas)
    with flow.no_grad():
        for k, v in backbone.state_dict().items():
            v.copy_(_like(data[f"model/backbone.{k}"], v))
            if _replicated(v):  # copy_ between broadcast tensors may also take rank 0's value
                v.to_local().copy_(flow.tensor(data[f"model/backbone.{k}"], dtype=v.dtype, device=v.to_local().device))
        padded = head.weight.shape[0]
        head.weight.copy_(_like(_pad_rows(data[f"model/{HEAD_WEIGHT}"], padded), head.weight))
    named = _named_params(backbone, head)
    wanted = OPTIMIZER_SLOTS.get(type(optimizer).__name__, ())
    slots = {}
    for key, value in data.items():
        if key.startswith("opt/"):
            param, slot = key[4:].rsplit("/", 1)
            if param in named and slot in wanted:
                ref = named[param]
                if param == HEAD_WEIGHT:
                    value = _pad_rows(value, ref.shape[0])
                slots[(param, slot)] = _like(value, ref)
    graph = _graph(step_fn)
    step_count = int(data.get(f"graph/{TRAIN_STEP_VAR}", np.array([meta["step"]]))[0])
    if graph is not None:
        state = {f"{param}-{EAGER_SLOTS[slot]}": t for (param, slot), t in slots.items()}
        ref_scalar = next(iter(backbone.parameters()))
        for key, value in data.items():
            if not key.startswith("graph/"):
                continue
            name = key[6:].replace("{graph}", graph.name)
            if "DynamicLossScale" in name and getattr(graph, "_grad_scaler", None) is None:
                continue  # saved under AMP, resumed without: nothing to restore
            state[name] = _broadcast(value, ref_scalar.placement)
        graph.load_state_dict(state, strict=False)
    else:
        for (param, slot), t in slots.items():
            optimizer._state.setdefault(named[param], {})[slot] = t
        optimizer._state["step"] = step_count
        if step_count:  # replay the schedule: the same calls, so the same LR, as an unbroken run
            for _ in range(step_count):
                scheduler.step()
    set_rng_states(data, meta)
    if hasattr(step_fn, "steps_done"):  # the steppers' own count (picks PartialFC's per-step sampling noise)
        step_fn.steps_done = int(meta["step"])
    return meta


def _check_model(path, data, meta, backbone, head):
    """The checkpoint must be for this backbone and this FC (class count, embedding size)."""
    own = {f"model/backbone.{k}": tuple(v.shape) for k, v in backbone.state_dict().items()}
    saved = {k: tuple(v.shape) for k, v in data.items() if k.startswith("model/backbone.")}
    missing, extra, wrong = _mismatch(own, saved)
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
