"""Every private OneFlow 0.9 API of_face relies on, in one place, with the reason for each.

OneFlow 0.9 exposes no public way to do these things; a OneFlow upgrade is checked here first.
Where a public equivalent exists it is used instead, not wrapped: `ParamGroup.options` (not
`_options`), `nn.Graph.is_compiled` (not `_is_compiled`); whether a graph trains or scales its
loss is recorded by the graph class itself (train/steps.py), not read from `_opts` /
`_grad_scaler`.
"""
import weakref
from typing import Any, Callable, Dict, Iterable, List

import oneflow as flow

# The LR schedulers' common base class, which OneFlow 0.9 names only privately (`_LRScheduler`):
# for annotations; SequentialLR and the others derive from it.
LRScheduler = flow.optim.lr_scheduler._LRScheduler


def sync() -> None:
    """Wait until every instruction queued on OneFlow's VM has run (`eager.Sync()`).

    Needed wherever the host reads or writes the local tensor of a variable that a compiled job
    also uses (FC rows, optimizer moments, step counters, BatchNorm statistics): those local
    accesses are not ordered against the compiled job, so without a wait they read stale values
    or race the job. Also orders the backbone's initialisers (run on the VM thread) before the
    random ops that draw from the same generator. nn.Graph.state_dict() does the same internally.
    """
    flow._oneflow_internal.eager.Sync()


def optimizer_state(optimizer: flow.optim.Optimizer) -> Dict[Any, Any]:
    """An eager optimizer's live state (`_state`): {parameter tensor: {slot: tensor}, "step": int}.

    The steppers need the live tensors keyed by parameter: they bias-correct and restore rows of
    the FC's slots in place, save the slots by parameter name and put them back before the first
    step. `Optimizer.state_dict()` keys the state by position in the param groups (and
    `load_state_dict` expects the same group layout back), which a checkpoint written in graph
    mode, or by another head layout, does not have.
    """
    return optimizer._state


def enable_sparse_updates(graph: flow.nn.Graph, variable_names: Iterable[str]) -> None:
    """Have nn.Graph rewrite the named variables' `gather` + optimizer into
    `indexed_slices_*_update` (only the gathered rows and their optimizer state change).

    GraphConfig has no setter for the job's `indexed_slices_optimizer_conf`; it is written into the
    graph's JobConfigProto (`config.proto`) directly.
    """
    sparse = graph.config.proto.indexed_slices_optimizer_conf
    sparse.enable = True
    for name in variable_names:
        sparse.include_op_names.op_name.append(name)


# rewrite(optimizer, train_conf, vars_conf, confs) -> the optimizer's confs after the rewrite
ConfRewrite = Callable[[flow.optim.Optimizer, Any, Any, List[Any]], List[Any]]


def rewrite_graph_conf(optimizer: flow.optim.Optimizer, rewrite: ConfRewrite) -> None:
    """Edit the optimizer confs nn.Graph compiles for `optimizer` (`_generate_conf_for_graph`).

    nn.Graph turns each param group into one optimizer conf through this private method, and
    the conf is the only place where, e.g., several groups can be made to share one clipped
    gradient norm (train/optim.py). The method is replaced on this optimizer instance only.
    """
    # no reference cycle (optimizer -> generate -> optimizer): a cycle keeps the optimizer and its
    # tensors alive until the collector runs, which may be after OneFlow's shutdown (measured: a
    # resumed 2-rank run then hung at exit)
    original, ref = type(optimizer)._generate_conf_for_graph, weakref.ref(optimizer)

    def generate(train_conf, vars_conf):
        opt = ref()
        return rewrite(opt, train_conf, vars_conf, original(opt, train_conf, vars_conf))

    optimizer._generate_conf_for_graph = generate


def full_graph_proto(graph: flow.nn.Graph) -> Any:
    """A compiled graph's job proto (`_full_graph_proto`): its op list, which export checks
    against what the ONNX converter supports before converting."""
    return graph._full_graph_proto


# OneFlow's functional namespace (`oneflow._C`), private by name in 0.9. Used for three ops that
# have no public form: `global_constant` (a constant made directly with a placement and SBP, so no
# local tensor is built and then placed inside a compiled job), `constant` (its local twin, for the
# eager and one-device paths), and `combined_margin_loss` (run on zeros it marks each row's label
# column, also on class-split logits where a rank holds only some columns: heads/margin.py).
functional = flow._C


def graph_grad(outputs: flow.Tensor, inputs: List[flow.Tensor]) -> Any:
    """The gradients of `outputs` with respect to `inputs` inside an nn.Graph's `build` (the
    job's own kernels), keeping the forward for a later `backward()`.

    The public `flow.autograd.grad` refuses the lazy tensors of a graph in 0.9; its private core
    (`grad_api`) takes them. Used by the parity replay to take the pre-clip gradient norm from the
    compiled step itself (a parameter has no `.grad` inside `build`).
    """
    from oneflow.autograd.autograd import convert_to_tensor_tuple, grad_api
    return grad_api(convert_to_tensor_tuple(outputs), convert_to_tensor_tuple(inputs),
                    convert_to_tensor_tuple(None), True, False)
