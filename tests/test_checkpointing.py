"""Activation checkpointing in the compiled training step (`StepOptions(checkpointing=True)`).

Two claims, each checked independently:
- recomputing the blocks in backward changes nothing numerically: same losses, same updated
  parameters and BN statistics (to 1e-5) as the step without checkpointing;
- the switch really reached OneFlow: its checkpointing pass adds recomputation ops named
  `Sys-Checkpointing-Fake-Fw-Op_<original op>` to the *compiled* job (read back from the runtime
  with `graph._compiled_graph_proto`, after OneFlow's job passes), one group per marked block,
  and none without the switch. This is OneFlow's own output, not our Python bookkeeping.

Single process, tiny models (a few seconds each on CPU).
"""
import dataclasses
import re

import numpy as np
import pytest

import of_face  # noqa: F401
import oneflow as flow
from of_face import parallel
from of_face.config import ModelCfg, load_config
from of_face.models import MODELS
from of_face.train.steps import StepOptions, checkpoint_block_names
from of_face.train.system import STEPPERS, build
from of_face.heads import fc_table

FAKE_OP = "Sys-Checkpointing-Fake-Fw-Op_"
EMB, CLASSES, BATCH, STEPS = 16, 10, 4, 2

TINY = {  # mask_ratio 0 and drop_path 0: no randomness in the step
    "iresnet": ModelCfg(name="iresnet", layers=[1, 1, 1, 1], width=4, embedding_size=EMB),
    "vit": ModelCfg(name="vit_t", vit_dim=16, vit_depth=2, embedding_size=EMB, mask_ratio=0.0),
    "mbf": ModelCfg(name="mbf", layers=[1, 1, 1, 1], width=8, embedding_size=EMB),
}


def snapshot(backbone, head):
    # copies: to_numpy may share memory with the tensor, which the training step updates in place
    state = {f"backbone.{k}": parallel.to_numpy(v).copy() for k, v in backbone.state_dict().items()}
    state["head.weight"] = fc_table.rows(head.weight).copy()
    return state


def load(backbone, head, state):
    """Overwrite every parameter and buffer with `state` (keeps placement and SBP)."""
    tensors = dict(backbone.state_dict(), **{"weight": head.weight})
    for k, v in tensors.items():
        key = "head.weight" if v is head.weight else f"backbone.{k}"
        if v is head.weight:  # [classes, dim] rows -> the FC table
            fc_table.load_rows(v, state[key])
            continue
        v.copy_(flow.tensor(state[key], dtype=v.dtype).to_global(placement=v.placement, sbp=v.sbp))


def build_system(model_cfg, checkpointing=False):
    """The run's parts through `build` (constant LR, dense FC), backbone `model_cfg`."""
    cfg = load_config(None, ["Global.mode=graph", "Global.seed=0", "Loss.margin=[1.0, 0.0, 0.35]", "Loss.scale=16.0",
                             "Optimizer.lr=0.1", "Optimizer.momentum=0.9", "Optimizer.weight_decay=5e-4",
                             f"Data.batch_size={BATCH}", "LRScheduler.power=0"])
    cfg = dataclasses.replace(cfg, Model=dataclasses.replace(model_cfg, activation_checkpointing=checkpointing))
    return build(cfg, CLASSES, total_steps=STEPS, warmup_steps=0)


def run_steps(model_cfg, checkpointing, init=None):
    """STEPS graph training steps from `init` (or a fresh init) on fixed batches.

    Returns (losses, initial state, final state, graph). manual_seed alone does not make two
    builds identical (OneFlow's global initialisers), so the second run loads the first's init.
    """
    system = build_system(model_cfg, checkpointing)
    backbone, head, graph = system.backbone, system.head, system.step.graph
    if init is not None:
        load(backbone, head, init)
    start = snapshot(backbone, head)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(STEPS):
        x = parallel.batch(rng.standard_normal((BATCH, 3, 112, 112)).astype(np.float32))
        y = parallel.batch(rng.integers(0, CLASSES, BATCH))
        losses.append(float(parallel.to_numpy(graph(x, y))))
    return losses, start, snapshot(backbone, head), graph


def fake_op_blocks(graph):
    """Backbone blocks that own a recomputation op in the compiled job, e.g. 'layer2.0'."""
    blocks = set()
    for op in graph._compiled_graph_proto.net.op:
        if op.name.startswith(FAKE_OP):
            # original op names look like 'backbone.layer2.0.conv1-conv2d-24'
            scope = op.name[len(FAKE_OP):].split("-")[0]
            blocks.add(scope)
    return blocks


def owning_block(scope, marked):
    """The marked block a module scope belongs to ('backbone.layer2.0.conv1' -> 'layer2.0')."""
    hits = [b for b in marked if re.match(rf"backbone\.{re.escape(b)}(\.|$)", scope)]
    return max(hits, key=len) if hits else None


@pytest.mark.parametrize("family", list(TINY))
def test_checkpointing_same_step_and_really_applied(family):
    losses0, init, state0, graph0 = run_steps(TINY[family], checkpointing=False)
    losses1, init1, state1, graph1 = run_steps(TINY[family], checkpointing=True, init=init)
    for k in init:
        np.testing.assert_array_equal(init1[k], init[k], err_msg=k)

    # numerically the same training step
    np.testing.assert_allclose(losses1, losses0, rtol=1e-5, atol=1e-5)
    assert state1.keys() == state0.keys()
    for k in state0:
        np.testing.assert_allclose(state1[k], state0[k], rtol=1e-5, atol=1e-5, err_msg=k)
    assert losses0[0] != losses0[1]  # the parameters did move between the two steps

    # the flag reached OneFlow: recomputation ops exist, exactly for the marked blocks
    marked = graph1.checkpointed_blocks
    assert marked and marked == checkpoint_block_names(graph1.backbone.to(flow.nn.Module))
    assert graph0.checkpointed_blocks == [] and fake_op_blocks(graph0) == set()
    scopes = fake_op_blocks(graph1)
    owners = {owning_block(s, marked) for s in scopes}
    assert None not in owners, f"recomputed ops outside the marked blocks: {scopes}"
    assert owners == set(marked), f"blocks without recomputation: {set(marked) - owners}"


def test_blocks_marked_in_published_models():
    counts = {name: len(checkpoint_block_names(MODELS[name]())) for name in ("iresnet50", "vit_t", "mbf")}
    # IResNet-50: 3+4+14+3 basic blocks; ViT-T: 12 transformer blocks; mbf: the 4+6+2 residual
    # bottlenecks (its stage 1 is a single grouped conv, the stride-2 bottlenecks have no add)
    assert counts == {"iresnet50": 24, "vit_t": 12, "mbf": 12}
    assert len(checkpoint_block_names(MODELS["mbf_large"]())) == 2 + 8 + 12 + 4


def test_config_switch_and_eager_refuses():
    assert ModelCfg().activation_checkpointing is False
    assert load_config(overrides=["Model.activation_checkpointing=true"]).Model.activation_checkpointing is True
    system = build_system(TINY["iresnet"])
    STEPPERS["graph"](system.parts, StepOptions(checkpointing=True))
    with pytest.raises(NotImplementedError, match="graph mode only"):
        STEPPERS["eager"](system.parts, StepOptions(checkpointing=True))
