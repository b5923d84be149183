"""MobileFaceNet and FaceViT: parameter counts, shapes, token masking, graph == eager, 2-rank step.

References are independent of the code under test: insightface's published counts for mbf, and
an arithmetic count from the architecture description for FaceViT.
"""
import numpy as np
import pytest

import of_face  # noqa: F401
import oneflow as flow
from of_face.config import ConfigError, ModelCfg
from of_face.models import FAMILY, MODELS, build_backbone
from of_face.models.face_vit import DropPath
from of_face.models.embed_graph import EmbedGraph

from conftest import run_worker

PUBLISHED_MBF = {"mbf": 2_059_520, "mbf_large": 6_314_880}  # insightface arcface_torch, 512-d
TOKENS = 144  # (112 // 9) ** 2

TINY = {  # small enough for CPU graphs; same code paths as the real sizes
    "iresnet": ModelCfg(name="iresnet", layers=[1, 1, 1, 1], width=4, embedding_size=512),
    "mbf": ModelCfg(name="mbf", layers=[1, 1, 1, 1], width=8),
    "mbf_large": ModelCfg(name="mbf_large", layers=[2, 1, 1, 1], width=8),  # residual stage 1
    "vit": ModelCfg(name="vit_t", vit_dim=16, vit_depth=2),
}


def tiny_vit(mask_ratio, drop_path_rate=0.0):
    return build_backbone(ModelCfg(name="vit_t", vit_dim=16, vit_depth=1, mask_ratio=mask_ratio,
                                   drop_path_rate=drop_path_rate))


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def face_vit_count(dim, depth, emb=512, tokens=TOKENS, patch=9):
    """FaceViT parameters from its description: pre-norm blocks, qkv without bias, MLP x4."""
    ln = 2 * dim
    block = ln + 3 * dim * dim + (dim * dim + dim) + ln + (dim * 4 * dim + 4 * dim) + (4 * dim * dim + dim)
    stem = 3 * patch * patch * dim + dim + tokens * dim  # patch conv (with bias), position embedding
    head = tokens * dim * dim + 2 * dim + dim * emb + 2 * emb  # Linear/BN/Linear/BN, no Linear bias
    return stem + depth * block + ln + dim + head  # final norm, mask token


# --------------------------------------------------------------------------- counts and shapes


@pytest.mark.parametrize("name", ["mbf", "mbf_large"])
def test_mbf_parameter_count_matches_insightface(name):
    assert n_params(MODELS[name]()) == PUBLISHED_MBF[name]
    assert n_params(build_backbone(ModelCfg(name=name))) == PUBLISHED_MBF[name]


@pytest.mark.parametrize("name,dim,depth", [("vit_t", 256, 12), ("vit_b", 512, 24)])
def test_face_vit_parameter_count(name, dim, depth):
    assert n_params(MODELS[name]()) == face_vit_count(dim, depth)
    plsc = {"vit_t": "FaceViT_tiny_patch9_112", "vit_b": "FaceViT_base_patch9_112"}[name]
    assert FAMILY[plsc] == "vit"
    if name == "vit_t":  # the alias builds the same architecture (vit_b: skip a second 114M build)
        assert n_params(MODELS[plsc]()) == face_vit_count(dim, depth)


def test_face_vit_tiny_override_count():
    model = build_backbone(ModelCfg(name="vit_l", vit_dim=16, vit_depth=3, embedding_size=64))
    assert n_params(model) == face_vit_count(16, 3, emb=64)


def test_output_shapes():
    x = flow.randn(2, 3, 112, 112)
    for model in (MODELS["mbf"](), build_backbone(TINY["vit"]), build_backbone(TINY["mbf_large"])):
        for train in (True, False):
            model.train(train)
            assert tuple(model(x).shape) == (2, 512)


def test_model_cfg_checks():
    for bad in (dict(mask_ratio=1.0), dict(mask_ratio=-0.1), dict(drop_path_rate=1.0), dict(vit_dim=12),
                dict(vit_depth=-1), dict(layers=[1, 1, 1, 1])):
        with pytest.raises(ConfigError):
            ModelCfg(name="vit_s", **bad).check()
    ModelCfg(name="vit_s", mask_ratio=0.1, drop_path_rate=0.1, vit_dim=16, vit_depth=2).check()
    ModelCfg(name="mbf", layers=[1, 2, 3, 1]).check()


def test_drop_path_rates_rise_linearly_and_drop_whole_samples():
    model = build_backbone(ModelCfg(name="vit_t", vit_dim=16, vit_depth=5, drop_path_rate=0.2))
    np.testing.assert_allclose([b.drop_path.prob for b in model.blocks], [0.0, 0.05, 0.1, 0.15, 0.2])
    dp = DropPath(0.5)
    out = dp(flow.ones(2000, 3, 4)).numpy()
    assert set(np.unique(out)) == {0.0, 2.0}  # survivors rescaled by 1 / keep
    assert np.all(out.min(axis=(1, 2)) == out.max(axis=(1, 2)))  # one decision per sample
    assert 0.4 < (out[:, 0, 0] == 0).mean() < 0.6
    dp.eval()
    assert np.all(dp(flow.ones(4, 3)).numpy() == 1.0)


# --------------------------------------------------------------------------- FaceViT masking


def test_masking_replaces_exact_count_with_mask_token_per_sample():
    model = tiny_vit(0.25).train()
    x = flow.randn(6, 3, 112, 112)
    tokens, mask = model.forward_tokens(x)
    tokens, mask = tokens.numpy(), mask.numpy().astype(bool)
    assert mask.shape == (6, TOKENS)
    assert mask.sum(1).tolist() == [round(TOKENS * 0.25)] * 6 == [36] * 6
    assert len({row.tobytes() for row in mask}) == 6  # every sample draws its own mask
    mask_token = model.mask_token.numpy()[0, 0]
    assert np.all(tokens[mask] == mask_token)
    assert not np.any(np.all(tokens[~mask] == mask_token, axis=-1))


def test_masked_tokens_are_dropped_from_attention():
    """Kept tokens' outputs equal the blocks run on the kept tokens alone (no mask token inside)."""
    model = tiny_vit(0.25).train()
    x = flow.randn(3, 3, 112, 112)
    tokens, mask = model.forward_tokens(x)
    mask = mask.numpy().astype(bool)
    embedded = model.embed(x).numpy()
    for i in range(3):
        alone = model.encode(flow.tensor(embedded[i][~mask[i]][None])).numpy()[0]
        np.testing.assert_allclose(tokens.numpy()[i][~mask[i]], alone, rtol=1e-5, atol=1e-5)


def test_forward_uses_the_masked_tokens():
    model = tiny_vit(0.25).train()
    x = flow.randn(4, 3, 112, 112)
    flow.manual_seed(7)
    out = model(x).numpy()
    flow.manual_seed(7)
    tokens, _ = model.forward_tokens(x)
    np.testing.assert_allclose(out, model.feature(flow.flatten(tokens, 1)).numpy(), rtol=1e-5, atol=1e-5)
    unmasked = model.feature(flow.flatten(model.encode(model.embed(x)), 1)).numpy()
    assert np.abs(out - unmasked).max() > 1e-3


def test_mask_ratio_005_masks_seven():
    _, mask = tiny_vit(0.05).train().forward_tokens(flow.randn(3, 3, 112, 112))
    assert mask.numpy().sum(1).tolist() == [7, 7, 7]  # round(7.2); arcface_torch's int() masks 8


def test_eval_masks_nothing_and_is_deterministic():
    model = tiny_vit(0.25, drop_path_rate=0.1).eval()
    x = flow.randn(3, 3, 112, 112)
    tokens, mask = model.forward_tokens(x)
    assert mask is None
    assert not np.any(np.all(tokens.numpy() == model.mask_token.numpy()[0, 0], axis=-1))
    np.testing.assert_array_equal(model(x).numpy(), model(x).numpy())


# --------------------------------------------------------------------------- graph mode


@pytest.mark.parametrize("family", list(TINY))
def test_graph_matches_eager(family):
    flow.manual_seed(0)
    model = build_backbone(TINY[family]).eval()
    x = flow.randn(2, 3, 112, 112)
    eager = model(x).numpy()
    graph = EmbedGraph(model)(x).numpy()
    assert eager.shape == (2, 512)
    np.testing.assert_allclose(graph, eager, rtol=1e-5, atol=1e-5)


def test_train_step_graph_two_ranks(tmp_path):
    """One compiled SGD step per family on 2 ranks (tests/workers/backbone_step.py)."""
    results = run_worker("backbone_step", tmp_path / "out.json", nproc=2, timeout=300)
    assert set(results) == {"iresnet", "mbf", "vit", "iresnet+amp", "mbf+amp", "vit+amp"}
    for family, r in results.items():
        assert np.isfinite(r["loss"]) and r["loss"] > 0, family
        assert r["changed"] == r["trainable"] > 0, family  # every trainable tensor moved
        assert r["rank_diff"] == 0.0, family  # replicas stay identical after the update
    for vit in (results["vit"], results["vit+amp"]):
        assert vit["masked"] == [36] * 8  # global batch of 8, random ops on split(0) tensors
        assert vit["distinct_masks"] == 8  # the two ranks do not draw the same masks


# --------------------------------------------------------------------------- training hooks


def test_models_declare_todays_training_hooks():
    """no_weight_decay() / checkpoint_blocks() equal the rules optim.py and steps.py applied
    before the models declared them (computed here from the block classes and names)."""
    from of_face.models import checkpoint_blocks, no_weight_decay
    from of_face.models.face_vit import Block
    from of_face.models.iresnet import IBasicBlock
    from of_face.models.mobilefacenet import Bottleneck

    for family, cfg in TINY.items():
        model = build_backbone(cfg)
        decay_rule = {n for n, p in model.named_parameters()
                      if p.dim() <= 1 or any(k in n for k in ("pos_embed", "mask_token"))}
        block_rule = [n for n, m in model.named_modules() if isinstance(m, (IBasicBlock, Block))
                      or (isinstance(m, Bottleneck) and m.residual)]
        assert block_rule, family
        assert model.no_weight_decay() == no_weight_decay(model) == decay_rule, family
        assert model.checkpoint_blocks() == checkpoint_blocks(model) == block_rule, family
    assert {"pos_embed", "mask_token"} <= build_backbone(TINY["vit"]).no_weight_decay()
    plain = flow.nn.Sequential(flow.nn.Linear(4, 3), flow.nn.BatchNorm1d(3))  # no hooks: generic rule
    assert no_weight_decay(plain) == {"0.bias", "1.weight", "1.bias"}
    assert checkpoint_blocks(plain) == []


def test_family_rules_checked_by_config_and_build():
    with pytest.raises(ConfigError, match="Model.name=iresnet needs Model.layers"):
        ModelCfg(name="iresnet").check()
    with pytest.raises(ValueError, match="Model.name=iresnet needs Model.layers"):
        build_backbone(ModelCfg(name="iresnet"))
    with pytest.raises(ValueError, match="Model.layers: does not apply to vit_t"):
        build_backbone(ModelCfg(name="vit_t", layers=[1, 1, 1, 1]))
    assert FAMILY["iresnet"] == "iresnet" and FAMILY["mbf_large"] == "mbf"
