"""Margin logits against the numpy formula; IResNet shapes and parameter counts."""
import numpy as np
import pytest

import of_face  # noqa: F401
import oneflow as flow
from of_face.heads.margin import ARCFACE, COSFACE, CombinedMargin
from of_face.models import MODELS, build_backbone
from of_face.config import ModelCfg


@pytest.mark.parametrize("margin", [ARCFACE, COSFACE, (1.0, 0.3, 0.2)], ids=["arcface", "cosface", "combined"])
def test_margin_logits_match_numpy(margin):
    rng = np.random.default_rng(1)
    cos = rng.uniform(-0.9, 0.9, (6, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 6)
    out = CombinedMargin(*margin, scale=64.0)(flow.tensor(cos), flow.tensor(labels)).numpy()
    m1, m2, m3 = margin
    expect = cos.astype(np.float64).copy()
    rows = np.arange(6)
    expect[rows, labels] = np.cos(m1 * np.arccos(cos[rows, labels]) + m2) - m3
    np.testing.assert_allclose(out, 64.0 * expect, rtol=1e-5, atol=1e-4)
    # non-target columns are untouched apart from the scale
    mask = np.ones_like(cos, bool)
    mask[rows, labels] = False
    np.testing.assert_allclose(out[mask], 64.0 * cos[mask], rtol=1e-6)


def independent_iresnet_count(layers, width=64, emb=512):
    """Parameters of insightface's IResNet from its architecture description, by arithmetic."""
    bn = lambda c: 2 * c  # noqa: E731  (gamma, beta; running stats are buffers)
    total = 3 * 9 * width + bn(width) + width  # stem conv, BN, PReLU
    cin = width
    for i, blocks in enumerate(layers):
        cout = width * 2**i
        for b in range(blocks):
            c_in = cin if b == 0 else cout
            total += bn(c_in) + c_in * cout * 9 + bn(cout) + cout + cout * cout * 9 + bn(cout)
            if b == 0:  # shape changes: 1x1 conv + BN shortcut
                total += c_in * cout + bn(cout)
        cin = cout
    return total + bn(cin) + cin * 49 * emb + emb + bn(emb)


PUBLISHED = {18: 24_025_600, 34: 34_139_328, 50: 43_590_848, 100: 65_156_160, 200: 118_833_920}


@pytest.mark.parametrize("depth", [18, 50])
def test_iresnet_parameter_count(depth):
    layers = {18: [2, 2, 2, 2], 50: [3, 4, 14, 3]}[depth]
    n = sum(p.numel() for p in MODELS[f"iresnet{depth}"]().parameters())
    assert n == PUBLISHED[depth] == independent_iresnet_count(layers)


def test_iresnet_output_shape_and_frozen_feature_scale():
    model = build_backbone(ModelCfg(name="iresnet", layers=[1, 1, 1, 1], width=8, embedding_size=32))
    model.eval()
    y = model(flow.randn(3, 3, 112, 112))
    assert tuple(y.shape) == (3, 32)
    assert not model.features.weight.requires_grad
    assert np.all(model.features.weight.numpy() == 1.0)
