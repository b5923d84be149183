"""One gradient norm clipped over all the backbone's parameter groups, graph and eager mode.

With `no_weight_decay_on_bn_bias` the backbone is two optimizer groups; PLSC (ClipGradByGlobalNorm)
and arcface_torch (clip_grad_norm_) bound ONE norm over all of them. Reference: the step's raw
gradient, read from an unclipped eager step (plain SGD, no decay: delta = -lr * g), and numpy's
float64 global norm over the backbone's gradients: clipped delta = -lr * g * max_norm / (|g| + 1e-6).
A per-group clip (what nn.Graph does with two groups unless they are merged) scales the two groups
by different factors and fails the comparison.

The decay of the two groups (AdamW, decoupled: p -= lr * wd * p on top of the Adam step) is checked
against numpy float64: the same step with and without decay differs by exactly -lr * wd * p for the
parameters the model decays and by nothing for those its `no_weight_decay()` lists, in both modes.
"""
import numpy as np
import pytest

import of_face  # noqa: F401  (loads cuDNN/cuBLAS before OneFlow)
from of_face import parallel
from of_face.config import load_config
from of_face.models import no_weight_decay
from of_face.train.system import build

LR, CLASSES, BATCH = 0.01, 10, 4


def one_step(mode, clip, name="sgd", wd=0.0, with_start=False):
    cfg = load_config(None, [
        f"Global.mode={mode}", "Global.seed=3", "Model.name=iresnet", "Model.layers=[1, 1, 1, 1]", "Model.width=4",
        "Model.embedding_size=8", "Loss.margin=[1.0, 0.0, 0.35]", "Loss.scale=16.0", f"Optimizer.name={name}",
        f"Optimizer.lr={LR}", "Optimizer.momentum=0.0", f"Optimizer.weight_decay={wd}",
        f"Optimizer.clip_grad_norm={clip}", "Optimizer.no_weight_decay_on_bn_bias=true",
        f"Data.batch_size={BATCH}", "LRScheduler.power=0",
    ])
    system = build(cfg, CLASSES, total_steps=2, warmup_steps=0)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((BATCH, 3, 112, 112)).astype(np.float32)
    labels = rng.integers(0, CLASSES, BATCH)
    named = dict(system.backbone.named_parameters())
    before = {n: parallel.to_numpy(p).astype(np.float64) for n, p in named.items()}
    system.step(parallel.batch(images), parallel.batch(labels))
    delta = {n: parallel.to_numpy(p).astype(np.float64) - before[n] for n, p in named.items()}
    groups = [len(g.parameters) for g in system.optimizer.param_groups]
    if with_start:
        return delta, groups, before, no_weight_decay(system.backbone)
    return delta, groups


@pytest.fixture(scope="module")
def raw():
    delta, groups = one_step("eager", 0.0)
    assert len(groups) == 3  # decayed backbone, not-decayed backbone, FC
    grads = {n: -d / LR for n, d in delta.items()}
    norm = np.sqrt(sum((g * g).sum() for g in grads.values()))
    return grads, norm


@pytest.mark.parametrize("mode", ["graph", "eager"])
def test_one_norm_over_the_backbone_groups(raw, mode):
    grads, norm = raw
    max_norm = 0.25 * norm  # the clip is active
    delta, _ = one_step(mode, max_norm)
    coef = max_norm / (norm + 1e-6)
    for n, g in grads.items():
        np.testing.assert_allclose(delta[n], -LR * coef * g, rtol=1e-4, atol=1e-7, err_msg=n)


def test_graph_merged_groups_keep_adamw_decay_per_group():
    """Graph AdamW, two backbone groups compiled as one clipped conf: the not-decayed group stays
    undecayed (the merged conf excludes it by name), as eager AdamW's own per-group decay does."""
    graph, _ = one_step("graph", 0.05, "adamw", wd=0.5)
    eager, _ = one_step("eager", 0.05, "adamw", wd=0.5)
    for n in graph:
        np.testing.assert_allclose(graph[n], eager[n], rtol=1e-4, atol=1e-6, err_msg=n)


@pytest.mark.parametrize("mode", ["graph", "eager"])
def test_adamw_decays_exactly_the_parameters_the_model_does_not_exempt(mode):
    """numpy float64 reference of the decoupled decay, group by group: one AdamW step with decay
    minus the same step without it (same gradients, same Adam update) is -lr * wd * p for a decayed
    parameter and 0 for one the model's `no_weight_decay()` lists."""
    wd = 0.5
    decayed, groups, start, skip = one_step(mode, 0.05, "adamw", wd=wd, with_start=True)
    plain, _ = one_step(mode, 0.05, "adamw", wd=0.0)
    assert len(groups) == 3 and skip and set(skip) < set(start)  # both backbone groups are non-empty
    # the exempt parameters are not all zero (BN scales start at 1): decaying them would show
    assert max(np.abs(start[n]).max() for n in skip) >= 0.1
    for n, p in start.items():
        want = np.zeros_like(p) if n in skip else -LR * wd * p
        np.testing.assert_allclose(decayed[n] - plain[n], want, rtol=1e-4, atol=2e-7,
                                   err_msg=f"{n} ({'not ' if n in skip else ''}decayed)")
