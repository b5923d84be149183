"""Export a trained backbone to ONNX (through oneflow-onnx) and check it against OneFlow.

    python -m of_face.export -c OUTPUT_DIR -o model.onnx [--config config.yaml] [--opset 11]
        [--bake-normalization] [--tolerance 1e-4]

`-c` is a training run's output folder (backbone.npz + config.yaml) or a `backbone.npz` file
(its config.yaml is read from the same folder unless `--config` names one).

The ONNX model holds the backbone only, FP32, input `input` float32 [N, 3, 112, 112] (NCHW, RGB)
with a dynamic batch N, output `embedding` [N, d] (not L2-normalised). Pixels are normalised
outside the model, as insightface's `onnx_ijbc.py` expects: (x - 127.5) / 127.5, which equals the
training normalisation (x / 255 - 0.5) / 0.5. With `--bake-normalization` that step is inside the
model and the input is the raw 0..255 RGB pixel values as float32.

oneflow-onnx converts a static `nn.Graph` traced with one batch size, and OneFlow lowers
`flatten` to a Reshape whose target shape holds that batch size. We trace with an unusual batch
size, then make the batch dimension dynamic: graph input/output dims become dim_param "N" and every
Reshape target that copies the traced batch becomes 0 ("copy the input's dim") or -1. The result
is then run with onnxruntime at batch 1, 3 and 17 against the OneFlow model in eval mode; the
file is only renamed into place when every batch agrees: max abs diff <= tolerance (default 1e-4)
x max(1, largest OneFlow output). oneflow-onnx 0.6.2 also writes a few nodes wrongly (ReduceSum
axes and ReLU6 bounds lost from opset 11/13, Flatten's axis misspelt); `fix_converter_output`
repairs them from the OneFlow graph, and the parity check would catch any other.
"""
import argparse
import os
import sys
import tempfile
import uuid

import numpy as np

import of_face  # noqa: F401  (preloads libraries; must precede oneflow)
import oneflow as flow

from of_face.checkpoint import BACKBONE_FILE, load_backbone
from of_face.config import Config, ModelCfg, load_config
from of_face.data.loader import normalize
from of_face.models import build_backbone
from of_face.train.steps import EmbedGraph

INPUT_NAME = "input"
OUTPUT_NAME = "embedding"
BATCH_DIM = "N"
MEAN, STD = 127.5, 127.5  # (x - 127.5) / 127.5 == (x / 255 - 0.5) / 0.5
IMAGE_SIZE = 112
# Batch size used to trace the graph: a prime that divides no channel, spatial or token size of
# the supported backbones (112 = 16 * 7, 144 tokens, powers-of-two widths), so the one entry of a
# Reshape target that is a multiple of it is the one carrying the batch.
TRACE_BATCH = 11


class ExportError(RuntimeError):
    """Export failed (conversion, a batch-size dependency left in the graph, or a parity miss)."""


# --------------------------------------------------------------------------- checkpoint + config


def resolve_checkpoint(run_dir_or_checkpoint, config=None):
    """(path of backbone.npz, ModelCfg) from a run folder or an .npz and an optional config."""
    path = os.fspath(run_dir_or_checkpoint)
    if os.path.isdir(path):
        npz = os.path.join(path, BACKBONE_FILE)
    else:
        npz = path
    if not os.path.isfile(npz):
        raise FileNotFoundError(f"checkpoint not found: {npz}")
    if config is None:
        config = os.path.join(os.path.dirname(os.path.abspath(npz)), "config.yaml")
        if not os.path.isfile(config):
            raise FileNotFoundError(f"no config.yaml next to {npz}; pass the run's config explicitly (--config)")
    if isinstance(config, ModelCfg):
        model_cfg = config
    elif isinstance(config, Config):
        model_cfg = config.Model
    else:
        model_cfg = load_config(os.fspath(config)).Model
    return npz, model_cfg


def load_model(run_dir_or_checkpoint, config=None):
    """Local backbone in eval mode with the checkpoint's weights: (module, ModelCfg, npz path)."""
    npz, model_cfg = resolve_checkpoint(run_dir_or_checkpoint, config)
    model = build_backbone(model_cfg)
    load_backbone(model, npz)
    model.eval()
    return model, model_cfg, npz


# --------------------------------------------------------------------------- ONNX graph surgery


def _rename_value(graph, old, new):
    """Rename a tensor everywhere in an ONNX graph (node inputs/outputs, graph inputs/outputs)."""
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        if vi.name == old:
            vi.name = new


def _constant_arrays(graph):
    """name -> (numpy array, setter) for initializers and Constant nodes."""
    from onnx import numpy_helper

    found = {}
    for init in graph.initializer:
        def set_init(arr, init=init):
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
        found[init.name] = (numpy_helper.to_array(init), set_init)
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    def set_const(arr, attr=attr, name=node.output[0]):
                        attr.t.CopyFrom(numpy_helper.from_array(arr, name))
                    found[node.output[0]] = (numpy_helper.to_array(attr.t), set_const)
    return found


def _static_shapes(model):
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return shapes


REDUCE_OPS = ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
              "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")


def _attr_value(attr):
    """Python value of a OneFlow AttrValue (the fields the repairs below read)."""
    for field in ("at_double", "at_float", "at_int64", "at_int32", "at_bool"):
        if attr.HasField(field):
            return getattr(attr, field)
    for field in ("at_list_int32", "at_list_int64"):
        if attr.HasField(field):
            return list(getattr(attr, field).val)
    return None


def flow_ops(job):
    """{OneFlow op name: (op type, {attr: value})} of a compiled graph's job proto."""
    ops = {}
    for op in job.net.op:
        if op.HasField("user_conf"):
            conf = op.user_conf
            ops[op.name] = (conf.op_type_name, {k: _attr_value(v) for k, v in conf.attr.items()})
    return ops


def _clip_bounds(op_type, attrs):
    """(min, max) of a OneFlow clip-like op; None where it has no such bound."""
    if op_type == "hardtanh":
        return attrs.get("min_val"), attrs.get("max_val")
    if op_type == "relu6":
        return 0.0, 6.0
    if op_type.startswith("clip_by_scalar"):
        # oneflow-onnx reads these with `a or b`, which loses a floating bound of 0.0
        lo = attrs.get("floating_min") if op_type != "clip_by_scalar_max" else None
        hi = attrs.get("floating_max") if op_type != "clip_by_scalar_min" else None
        return lo, hi
    raise ExportError(f"unexpected OneFlow op {op_type} converted to Clip")


def fix_converter_output(model, opset, ops=None):
    """Repair what oneflow-onnx 0.6.2 writes wrongly; returns the number of nodes changed.

    `ops` is `flow_ops(graph._full_graph_proto)`: ONNX node names are the OneFlow op names, so the
    original attributes can be read back where the converter lost them.
    - Flatten's axis attribute is spelled "aixs" (ignored, so axis would default to 1).
    - Reduce ops get their axes as an attribute at every opset, but ReduceSum takes axes as an
      input from opset 13 (the others from opset 18). The converter drops the attribute there, so
      the node reduces over *all* axes: FaceViT's LayerNorm mean (OneFlow lowers LayerNorm on CPU
      to reduce_sum / var ops) became the mean of the whole batch.
    - hardtanh (nn.ReLU6) becomes a Clip without bounds from opset 11 (bounds moved to inputs;
      the converter adds them only for clip_by_scalar), i.e. an identity.
    Axes and bounds are taken from the OneFlow op and added as constant inputs.
    """
    from onnx import numpy_helper

    graph, changed, ops = model.graph, 0, ops or {}

    def const_input(node, suffix, array):
        name = f"{node.name}__{suffix}"
        graph.initializer.append(numpy_helper.from_array(array, name))
        return name

    for node in graph.node:
        if node.op_type == "Flatten":
            for attr in node.attribute:
                if attr.name == "aixs":
                    attr.name = "axis"
                    changed += 1
        elif node.op_type in REDUCE_OPS and opset >= (13 if node.op_type == "ReduceSum" else 18) \
                and len(node.input) < 2:
            attrs = {a.name: a for a in node.attribute}
            if "axes" in attrs:
                axes = list(attrs["axes"].ints)
                node.attribute.remove(attrs["axes"])
            elif node.name in ops and "axis" in ops[node.name][1]:
                axes = ops[node.name][1]["axis"]
            else:
                raise ExportError(f"{node.op_type} {node.name}: reduction axes lost in conversion and not found "
                                  "in the OneFlow graph")
            node.input.append(const_input(node, "axes", np.array(axes, np.int64)))
            changed += 1
        elif node.op_type == "Clip" and opset >= 11:
            inputs = list(node.input) + [""] * (3 - len(node.input))
            if inputs[1] and inputs[2]:
                continue
            if node.name not in ops:
                raise ExportError(f"Clip {node.name}: bounds missing and no OneFlow op of that name")
            lo, hi = _clip_bounds(*ops[node.name])
            if not inputs[1] and lo is not None:
                inputs[1] = const_input(node, "min", np.array(lo, np.float32))
            if not inputs[2] and hi is not None:
                inputs[2] = const_input(node, "max", np.array(hi, np.float32))
            while inputs and not inputs[-1]:
                inputs.pop()
            if inputs != list(node.input):
                del node.input[:]
                node.input.extend(inputs)
                changed += 1
    return changed


def _batch_dependent(graph):
    """Names of the tensors computed from the graph input (weights-only subgraphs excluded)."""
    dependent = {vi.name for vi in graph.input}
    for node in graph.node:  # oneflow-onnx writes nodes in topological order
        if any(name in dependent for name in node.input):
            dependent.update(node.output)
    return dependent


INT64_MAX = np.iinfo(np.int64).max


def _dynamic_reshape_target(node, target, in_shape, traced_batch):
    """The Reshape target with the batch entry made dynamic (0 = copy input dim, -1 = infer)."""
    where = [i for i, v in enumerate(target.tolist()) if v > 0 and v % traced_batch == 0]
    if not where and -1 in target.tolist():
        return target  # e.g. [-1, C] written by the converter itself: the -1 already absorbs the batch
    if len(where) != 1:
        raise ExportError(
            f"Reshape {node.name}: input {in_shape} -> target {target.tolist()}: expected exactly one entry "
            f"carrying the traced batch size {traced_batch}, found {len(where)}; cannot make the batch dynamic")
    i, new = where[0], target.copy()
    if i < len(in_shape) and in_shape[i] == target[i]:
        new[i] = 0  # the same axis passes through: copy it from the input
    elif -1 in target.tolist():
        raise ExportError(f"Reshape {node.name}: target {target.tolist()} already has -1; cannot make the batch dynamic")
    else:
        new[i] = -1  # batch merged into / split off another axis: infer it
    return new


def make_batch_dynamic(model, traced_batch):
    """Turn the traced batch size into a dynamic dim "N"; returns the number of patched constants.

    Only nodes computed from the graph input are touched. Reshape targets: the one entry that is a
    multiple of the traced batch becomes 0 (copy the input's dim) where that axis passes through,
    else -1 (e.g. [B, C, 7, 7] -> [B, C*49] gets [0, C*49]; FaceViT's q = qkv[0], a [1, B, ...]
    slice, reshaped to [B, ...] gets -1). Slice ends that reach the end of an axis become INT64_MAX.
    Any other op with a batch-size constant (Expand/Tile/ConstantOfShape) is refused.
    """
    from onnx import numpy_helper

    graph = model.graph
    shapes = _static_shapes(model)
    consts = _constant_arrays(graph)
    dependent = _batch_dependent(graph)
    users = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    patched = 0

    def replace(node, index, new):
        nonlocal patched
        name = node.input[index]
        if users.get(name, 0) == 1:
            consts[name][1](new.astype(np.int64))
        else:  # a shared constant: give this node its own copy
            copy = f"{name}__dyn{patched}"
            graph.initializer.append(numpy_helper.from_array(new.astype(np.int64), copy))
            node.input[index] = copy
        patched += 1

    for node in graph.node:
        if not node.input or node.input[0] not in dependent:
            continue
        in_shape = shapes.get(node.input[0])
        if node.op_type == "Reshape":
            if node.input[1] not in consts:
                raise ExportError(f"Reshape {node.name}: target shape is not a constant; cannot make the batch dynamic")
            if in_shape is None or None in in_shape:
                raise ExportError(f"Reshape {node.name}: input shape unknown ({in_shape})")
            target = consts[node.input[1]][0]
            new = _dynamic_reshape_target(node, target, in_shape, traced_batch)
            if not np.array_equal(new, target):
                replace(node, 1, new)
        elif node.op_type == "Slice" and len(node.input) >= 3:
            if any(name not in consts for name in node.input[1:] if name):
                raise ExportError(f"Slice {node.name}: non-constant bounds; cannot make the batch dynamic")
            starts, ends = consts[node.input[1]][0], consts[node.input[2]][0]
            axes = (consts[node.input[3]][0] if len(node.input) > 3 and node.input[3]
                    else np.arange(len(starts)))
            if in_shape is None or None in in_shape:
                raise ExportError(f"Slice {node.name}: input shape unknown ({in_shape})")
            full = np.array([ends[k] >= in_shape[int(a)] for k, a in enumerate(axes)])
            if full.any():
                replace(node, 2, np.where(full, INT64_MAX, ends))
    # Other shape-carrying constants would still hold the traced batch size.
    for node in graph.node:
        shape_inputs = node.input[:1] if node.op_type == "ConstantOfShape" else node.input[1:]
        if node.op_type in ("Expand", "Tile", "ConstantOfShape") and any(
                name in consts and consts[name][0].ndim == 1 and traced_batch in consts[name][0].tolist()
                for name in shape_inputs):
            raise ExportError(f"{node.op_type} {node.name} has a constant holding the traced batch size "
                              f"{traced_batch}: not supported for a dynamic batch")
    for vi in list(graph.input) + list(graph.output):
        dim0 = vi.type.tensor_type.shape.dim[0]
        dim0.Clear()
        dim0.dim_param = BATCH_DIM
    del graph.value_info[:]  # stale static shapes; onnxruntime infers its own
    return patched


def add_normalization(model, mean=MEAN, std=STD):
    """Prepend (x - mean) / std to the graph: its input becomes raw 0..255 float pixels."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inner = f"{INPUT_NAME}__normalized"
    _rename_value(graph, INPUT_NAME, inner)
    graph.input[0].name = INPUT_NAME  # the graph input keeps its name; its consumers read `inner`
    centered = f"{INPUT_NAME}__centered"
    graph.initializer.extend([
        numpy_helper.from_array(np.array(mean, dtype=np.float32), "pixel_mean"),
        numpy_helper.from_array(np.array(std, dtype=np.float32), "pixel_std"),
    ])
    nodes = [helper.make_node("Sub", [INPUT_NAME, "pixel_mean"], [centered], name="normalize_sub"),
             helper.make_node("Div", [centered, "pixel_std"], [inner], name="normalize_div")]
    for node in reversed(nodes):
        graph.node.insert(0, node)


# --------------------------------------------------------------------------- export


def _oneflow_embed(model, x):
    with flow.no_grad():
        return model(flow.tensor(x, dtype=flow.float32)).numpy()


def _parity_batches(batch_sizes, seed=0):
    """uint8 images [n, 3, 112, 112] per batch size: per image a random colour, gradient and
    stripe pattern plus noise (pure noise images all embed alike once pooled, a weak check)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] / float(IMAGE_SIZE)
    batches = {}
    for n in batch_sizes:
        out = np.empty((int(n), 3, IMAGE_SIZE, IMAGE_SIZE))
        for i in range(int(n)):
            base = rng.uniform(60, 200, (3, 1, 1))
            grad = rng.uniform(-80, 80, (2, 3, 1, 1))
            fx, fy, phase = rng.uniform(1, 6), rng.uniform(1, 6), rng.uniform(0, 2 * np.pi)
            out[i] = (base + grad[0] * (xx - 0.5) + grad[1] * (yy - 0.5)
                      + 40 * np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)
                      + rng.normal(0, 20, (3, IMAGE_SIZE, IMAGE_SIZE)))
        batches[int(n)] = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return batches


def check_parity(onnx_path, model, baked=False, batch_sizes=(1, 3, 17), tolerance=1e-4):
    """Max abs difference onnxruntime vs OneFlow (eval, eager) per batch size; raises on a miss.

    A batch passes when max|onnx - oneflow| <= tolerance * max(1, max|oneflow|): an absolute
    bound for embeddings within +-1, relative to the output's size beyond (float32 rounding grows
    with it: a full-width MobileFaceNet whose outputs reach 55 differs by 1.0e-4, 1.8e-6 relative).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
    diffs = {}
    for n, pixels in _parity_batches(batch_sizes).items():
        normed = normalize(pixels)
        feed = pixels.astype(np.float32) if baked else normed
        try:
            got = sess.run([OUTPUT_NAME], {INPUT_NAME: feed})[0]
        except Exception as e:
            raise ExportError(f"onnxruntime failed at batch {n}: {e}") from None
        want = _oneflow_embed(model, normed)
        if got.shape != want.shape:
            raise ExportError(f"batch {n}: ONNX output shape {got.shape} != OneFlow {want.shape}")
        diffs[n] = float(np.abs(got - want).max())
        scale = float(np.abs(want).max())
        limit = tolerance * max(1.0, scale)
        if not np.isfinite(diffs[n]) or diffs[n] > limit:
            raise ExportError(
                f"ONNX and OneFlow outputs differ at batch {n}: max abs diff {diffs[n]:.3g} > tolerance "
                f"{tolerance:g} x max(1, largest OneFlow output {scale:.3g}) = {limit:.3g}; "
                f"a larger --tolerance accepts it")
    return diffs


def _check_convertible(ops, opset, model_name):
    """Name the OneFlow ops oneflow-onnx has no conversion for at this opset (it would crash later)."""
    from oneflow_onnx.oneflow2onnx import flow2onnx  # noqa: F401  (registers the handlers)
    from oneflow_onnx.oneflow2onnx.handler import flow_op

    supported = flow_op.CreateMapping(opset, None)
    missing = sorted({op_type for op_type, _ in ops.values()} - set(supported))
    if missing:
        higher = [v for v in range(opset + 1, 17) if not set(missing) - set(flow_op.CreateMapping(v, None))]
        hint = f"; use --opset {higher[0]} or higher" if higher else ""
        flow_op.CreateMapping(opset, None)
        raise ExportError(f"oneflow-onnx cannot convert the OneFlow op(s) {', '.join(missing)} of {model_name} "
                          f"at opset {opset}{hint}")


def export_onnx(run_dir_or_checkpoint, out_path, config=None, opset=11, bake_normalization=False,
                batch_for_check=(1, 3, 17), tolerance=1e-4, verbose=False):
    """Export a checkpoint's backbone to `out_path`; returns {"path", "max_abs_diff": {batch: diff}, ...}.

    Nothing is written at `out_path` unless conversion and the parity check both succeed.
    """
    import onnx
    from oneflow_onnx.oneflow2onnx.flow2onnx import Export

    model, model_cfg, npz = load_model(run_dir_or_checkpoint, config)
    out_path = os.path.abspath(os.fspath(out_path))
    out_dir = os.path.dirname(out_path)
    os.makedirs(out_dir, exist_ok=True)
    tmp_out = os.path.join(out_dir, f".{os.path.basename(out_path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with tempfile.TemporaryDirectory(prefix="of_face_export_") as work:
            graph = EmbedGraph(model)
            example = normalize(_parity_batches([TRACE_BATCH], seed=1)[TRACE_BATCH])
            with flow.no_grad():
                graph(flow.tensor(example, dtype=flow.float32))  # trace + compile at TRACE_BATCH
            ops = flow_ops(graph._full_graph_proto)
            _check_convertible(ops, opset, model_cfg.name)
            weights = os.path.join(work, "weights")
            flow.save(graph.state_dict(), weights)
            raw = os.path.join(work, "raw.onnx")
            try:
                if verbose:
                    Export(graph, weights, raw, opset=opset)
                else:
                    _quiet(Export, graph, weights, raw, opset=opset)
            except Exception as e:
                raise ExportError(f"oneflow-onnx could not convert {model_cfg.name}: {type(e).__name__}: {e}") from e
            proto = onnx.load(raw)
            if len(proto.graph.input) != 1 or len(proto.graph.output) != 1:
                raise ExportError(f"expected one input and one output, got {len(proto.graph.input)} / "
                                  f"{len(proto.graph.output)}")
            _rename_value(proto.graph, proto.graph.input[0].name, INPUT_NAME)
            _rename_value(proto.graph, proto.graph.output[0].name, OUTPUT_NAME)
            fix_converter_output(proto, opset, ops)
            patched = make_batch_dynamic(proto, TRACE_BATCH)
            if bake_normalization:
                add_normalization(proto)
            proto.producer_name = "of_face"
            del proto.metadata_props[:]
            for key, value in (("normalization", "inside: raw 0..255 RGB" if bake_normalization
                                else f"outside: (x - {MEAN}) / {STD}, RGB"),
                               ("model", model_cfg.name), ("embedding_size", str(model_cfg.embedding_size))):
                entry = proto.metadata_props.add()
                entry.key, entry.value = key, value
            onnx.checker.check_model(proto)
            with open(tmp_out, "xb") as f:
                f.write(proto.SerializeToString())
        diffs = check_parity(tmp_out, model, baked=bake_normalization, batch_sizes=batch_for_check,
                             tolerance=tolerance)
        os.replace(tmp_out, out_path)
    except BaseException:
        if os.path.exists(tmp_out):
            os.unlink(tmp_out)
        raise
    return {"path": out_path, "max_abs_diff": diffs, "opset": opset, "bake_normalization": bool(bake_normalization),
            "checkpoint": npz, "shape_constants_patched": patched, "embedding_size": model_cfg.embedding_size}


def _quiet(fn, *args, **kwargs):
    """Run fn with the converter's prints and info logs silenced (errors still raise)."""
    import contextlib
    import io
    import logging

    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return fn(*args, **kwargs)
    finally:
        logging.getLogger().setLevel(level)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="of-face export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-c", "--checkpoint", required=True, help="run output folder or backbone.npz")
    ap.add_argument("-o", "--out", required=True, help="ONNX file to write")
    ap.add_argument("--config", default=None, help="config.yaml (default: the one next to the checkpoint)")
    ap.add_argument("--opset", type=int, default=11)
    ap.add_argument("--bake-normalization", action="store_true",
                    help="put (x - 127.5) / 127.5 inside the model (input: raw 0..255 RGB floats)")
    ap.add_argument("--tolerance", type=float, default=1e-4,
                    help="allowed max abs diff ONNX vs OneFlow, times max(1, largest output) (default 1e-4)")
    ap.add_argument("--check-batches", default="1,3,17", help="batch sizes of the parity check")
    ap.add_argument("-v", "--verbose", action="store_true", help="show oneflow-onnx's own output")
    args = ap.parse_args(argv)
    batches = tuple(int(b) for b in args.check_batches.split(",") if b.strip())
    try:
        r = export_onnx(args.checkpoint, args.out, config=args.config, opset=args.opset,
                        bake_normalization=args.bake_normalization, batch_for_check=batches,
                        tolerance=args.tolerance, verbose=args.verbose)
    except (ExportError, FileNotFoundError, ValueError) as e:
        print(f"export failed: {e}", file=sys.stderr)
        return 1
    diffs = ", ".join(f"batch {n}: {d:.2e}" for n, d in r["max_abs_diff"].items())
    print(f"wrote {r['path']} (opset {r['opset']}, input '{INPUT_NAME}' [N,3,112,112], output "
          f"'{OUTPUT_NAME}' [N,{r['embedding_size']}], normalisation "
          f"{'inside' if r['bake_normalization'] else 'outside: (x-127.5)/127.5'}); "
          f"ONNX vs OneFlow max abs diff {diffs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
