"""Repairs and rewrites of the ONNX model that oneflow-onnx 0.6.2 writes (used by of_face/export.py).

- `fix_converter_output`: the converter drops ReduceSum/ReduceMean axes and ReLU6 (Clip) bounds in
  opset 11/13 and misspells Flatten's axis; the values are put back from the OneFlow graph's ops.
- `make_batch_dynamic`: the graph was traced with one batch size; graph input/output dims become
  dim_param "N" and every Reshape target / Slice bound that holds the traced batch is rewritten.
- `add_normalization`: optionally bakes (x - 127.5) / 127.5 into the model.
Anything that cannot be rewritten safely raises ExportError naming the node.
"""
import numpy as np

from of_face.errors import RUNTIME, ToolError

INPUT_NAME = "input"
OUTPUT_NAME = "embedding"
BATCH_DIM = "N"
MEAN, STD = 127.5, 127.5  # (x - 127.5) / 127.5 == (x / 255 - 0.5) / 0.5


class ExportError(ToolError):
    """Export failed (conversion, a batch-size dependency left in the graph, or a parity miss): a
    runtime failure (exit code 1) unless raised with code 2 for a refused argument."""

    code = RUNTIME


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
        raise ExportError(f"Reshape {node.name}: target {target.tolist()} already has -1; "
                          "cannot make the batch dynamic")
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
