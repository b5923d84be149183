"""insightface-style ONNX (IResNet, MobileFaceNet) -> an of_face backbone's state dict.

Weights are matched by graph structure, never by node or initializer names (exporters rename
and deduplicate them: arcface_torch's `convert_onnx` shares one PReLU slope initializer among
every PReLU whose initial values are equal, and names folded weights `onnx::Conv_520`):

- the graph's weighted ops (Conv, BatchNormalization, PRelu, MatMul / Gemm + the Add of a bias
  constant; constants resolved through Identity and Constant nodes) in a canonical order that
  does not depend on how the exporter listed the nodes: a depth-first walk back from the output
  that, where two branches join (a residual Add), takes the branch with more nodes behind it
  first. So a residual block reads main branch, then shortcut (its 1x1 downsample conv), whether
  the exporter traced the shortcut first (oneflow-onnx: of_face's IResNet computes it first) or
  last (torch.onnx);
- the backbone's weighted modules, in registration order (= forward order for these models):
  Conv2d, BatchNorm, PReLU, Linear;
- one walk over both: each module takes the next op of its kind, shape-checked.

Folded BatchNorm (the TorchScript exporter folds every BN that directly follows a Conv into it):
the Conv carries W' = W*g/sqrt(v+eps) and a bias b'. of_face's conv has no bias, so the conv takes
W' and its BatchNorm becomes `y = z + b'` at inference: weight 1, bias b', running mean 0 and a
running variance whose float32 sum with eps is exactly 1. Inference is then exact; training from
such a file restarts BN statistics from these values (the raw ones are gone from the file).
An unfolded Conv -> BatchNormalization pair maps one to one.
"""
from typing import Dict, List, Optional

import numpy as np
import oneflow.nn as nn

from of_face.models.import_pth import WeightsFileError

WEIGHTED = (nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.PReLU, nn.Linear)


class _Op:
    def __init__(self, kind: str, node, params: List[np.ndarray], eps: float = 0.0):
        self.kind, self.node, self.params, self.eps = kind, node, params, eps
        self.input, self.output = node.input[0], node.output[0]


def _load(path: str):
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:  # pragma: no cover - onnx is in requirements.txt
        raise WeightsFileError(f"{path}: reading ONNX needs the onnx package") from None
    try:
        model = onnx.load(path)
    except Exception as e:  # protobuf DecodeError of a cut file, among others
        raise WeightsFileError(f"{path}: truncated or damaged ONNX file ({type(e).__name__}: {e})") from None
    if not model.graph.node:
        raise WeightsFileError(f"{path}: ONNX file has no graph (truncated or damaged)")
    return model.graph, numpy_helper


def _constants(graph, numpy_helper) -> Dict[str, np.ndarray]:
    """Every constant tensor by name: initializers, Constant nodes and Identity copies of them."""
    const = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    const[node.output[0]] = numpy_helper.to_array(a.t)
        elif node.op_type == "Identity" and node.input[0] in const:
            const[node.output[0]] = const[node.input[0]]
    return const


def _attr(node, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return a.f if a.type == a.FLOAT else a.i
    return default


def canonical_order(graph, const: Dict[str, np.ndarray]) -> list:
    """The graph's nodes, main branches before shortcuts (see the module docstring)."""
    producer = {out: node for node in graph.node for out in node.output}
    ancestors: Dict[int, set] = {}  # id(node) -> ids of every node it depends on (itself included)
    for node in graph.node:  # exported graphs list nodes topologically
        mine = {id(node)}
        for name in node.input:
            if name in producer and name not in const:
                mine |= ancestors.get(id(producer[name]), set())
        ancestors[id(node)] = mine
    order, done = [], set()
    stack = [(producer[o.name], False) for o in reversed(graph.output) if o.name in producer]
    while stack:  # iterative post-order (deep ResNets exceed Python's recursion limit)
        node, expanded = stack.pop()
        if id(node) in done:
            continue
        if expanded:
            done.add(id(node))
            order.append(node)
            continue
        stack.append((node, True))
        inputs = [producer[n] for n in node.input if n in producer and n not in const]
        inputs.sort(key=lambda n: len(ancestors[id(n)]), reverse=True)  # the longer branch first...
        stack.extend((n, False) for n in reversed(inputs))  # ...so pushed last
    return order


def weighted_ops(path: str) -> List[_Op]:
    """The graph's weighted ops in canonical order, with their constant operands as arrays."""
    graph, numpy_helper = _load(path)
    const = _constants(graph, numpy_helper)
    ops: List[_Op] = []
    for node in canonical_order(graph, const):
        args = [const.get(name) for name in node.input]
        kind = node.op_type
        if kind == "Conv":
            ops.append(_Op("conv", node, [args[1], args[2] if len(args) > 2 else None]))
        elif kind == "BatchNormalization":
            ops.append(_Op("bn", node, args[1:5], eps=_attr(node, "epsilon", 1e-5)))
        elif kind == "PRelu":
            ops.append(_Op("prelu", node, [args[1]]))
        elif kind == "MatMul" and args[1] is not None:
            ops.append(_Op("linear", node, [args[1].T, None]))
        elif kind == "Gemm" and args[1] is not None:
            w = args[1] if _attr(node, "transB", 0) else args[1].T
            ops.append(_Op("linear", node, [w, args[2] if len(args) > 2 else None]))
        elif kind == "Add" and ops and ops[-1].kind == "linear" and ops[-1].params[1] is None \
                and ops[-1].output in node.input and any(a is not None for a in args):
            ops[-1].params[1] = next(a for a in args if a is not None)  # MatMul + bias
            ops[-1].output = node.output[0]
        else:
            continue
        if any(p is None for p in ops[-1].params[:1]):
            raise WeightsFileError(f"{path}: {kind} node {node.name or node.output[0]!r} has a weight computed "
                                   f"in the graph, not a constant (not an exported backbone?)")
    return ops


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d):
        return "conv"
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return "bn"
    return "prelu" if isinstance(module, nn.PReLU) else "linear"


def _identity_bn(state: Dict[str, np.ndarray], prefix: str, bias: Optional[np.ndarray], bn: nn.Module) -> None:
    """BatchNorm set to y = z + bias at inference (bias None: zero)."""
    c = bn.weight.shape[0]
    eps = np.float32(bn.eps)
    var = np.float32(1.0) - eps
    if var + eps != np.float32(1.0):  # pick the float32 below 1 whose sum with eps is exactly 1
        var = np.nextafter(var, np.float32(2.0) if var + eps < 1 else np.float32(0.0))
    state[prefix + "weight"] = np.ones(c, np.float32)
    state[prefix + "bias"] = np.zeros(c, np.float32) if bias is None else bias.astype(np.float32)
    state[prefix + "running_mean"] = np.zeros(c, np.float32)
    state[prefix + "running_var"] = np.full(c, var, np.float32)
    state[prefix + "num_batches_tracked"] = np.zeros((), np.int64)


def from_onnx(path: str, backbone: nn.Module) -> Dict[str, np.ndarray]:
    """{of_face name: array} for `backbone` (IResNet or MobileFaceNet) from an exported ONNX graph."""
    from of_face.models.face_vit import FaceViT

    if isinstance(backbone, FaceViT):
        raise WeightsFileError(f"{path}: ONNX import covers IResNet and MobileFaceNet; import a ViT from its .pth")
    ops = weighted_ops(path)
    mods = [(n, m) for n, m in backbone.named_modules() if isinstance(m, WEIGHTED)]
    state: Dict[str, np.ndarray] = {}
    i = 0  # next ONNX op
    folded_bias = None  # a folded conv's bias, waiting for the BatchNorm module after the conv
    for j, (name, mod) in enumerate(mods):
        prefix, kind = (name + "." if name else ""), _kind(mod)
        if kind == "bn" and folded_bias is not None:
            _identity_bn(state, prefix, folded_bias[0], mod)
            folded_bias = None
            continue
        if i >= len(ops):
            raise WeightsFileError(f"{path}: the graph has no weighted op left for of_face '{name}' "
                                   f"({type(mod).__name__}); another architecture?")
        op = ops[i]
        i += 1
        if op.kind != kind:
            shapes = [list(np.shape(p)) for p in op.params]
            raise WeightsFileError(f"{path}: graph op {i} is {op.node.op_type} {shapes} where of_face '{name}' is a "
                                   f"{type(mod).__name__} {list(mod.weight.shape)}; another architecture?")
        if kind == "prelu":
            state[prefix + "weight"] = op.params[0].reshape(-1)
        elif kind == "bn":
            scale, bias, mean, var = op.params
            # same inference output under of_face's eps: var + eps_file = var' + eps_of_face
            state.update({prefix + "weight": scale, prefix + "bias": bias, prefix + "running_mean": mean,
                          prefix + "running_var": (var.astype(np.float64) + op.eps - mod.eps).astype(np.float32),
                          prefix + "num_batches_tracked": np.zeros((), np.int64)})
        else:  # conv / linear, maybe with a BatchNorm folded into it
            weight, bias = op.params
            state[prefix + "weight"] = weight
            has_bias = getattr(mod, "bias", None) is not None
            if has_bias:
                state[prefix + "bias"] = bias if bias is not None else np.zeros(mod.bias.shape, np.float32)
                bias = None
            nxt = mods[j + 1][1] if j + 1 < len(mods) else None
            unfolded = i < len(ops) and ops[i].kind == "bn" and ops[i].input == op.output
            if isinstance(nxt, (nn.BatchNorm1d, nn.BatchNorm2d)) and not unfolded:
                folded_bias = (bias,)  # the BN after this layer was folded into it
            elif bias is not None and unfolded:  # layer bias + BN: the BN's mean absorbs the bias
                ops[i].params[2] = ops[i].params[2] - bias
            elif bias is not None:
                raise WeightsFileError(f"{path}: the graph's {op.node.op_type} for of_face '{name}' has a bias "
                                       f"of_face has no place for; another architecture?")
    if i < len(ops):
        op = ops[i]
        raise WeightsFileError(f"{path}: graph op {op.node.op_type} {[list(np.shape(p)) for p in op.params]} is left "
                               f"over after every of_face layer was filled; another architecture?")
    return state
