"""class_split_cross_entropy (the head's loss) against float64 numpy, extreme logits included.

Its log-sum-exp is shifted by the exact row max, taken per rank and then over the ranks' maxima.
Rows 2 and 3 are where a shift by the target alone would overflow and one by the largest possible
logit would underflow; on 2 ranks at 10,240 classes each, row 2 also overflowed the earlier shift
by max(target, s - 80) (20k terms of e^80 exceed float32).
"""
from pathlib import Path

import numpy as np
import pytest

import of_face  # noqa: F401
import oneflow as flow
from of_face import parallel
from of_face.heads.partial_fc import class_split_cross_entropy

from conftest import launch

S = 64.0  # max_logit of ArcFace at s = 64


def numpy_loss_and_grad(z, labels):
    z = z.astype(np.float64)
    m = z.max(axis=1, keepdims=True)
    p = np.exp(z - m)
    p /= p.sum(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(z - m).sum(axis=1))
    n = len(labels)
    loss = np.mean(lse - z[np.arange(n), labels])
    grad = p.copy()
    grad[np.arange(n), labels] -= 1.0
    return loss, grad / n


def rows():
    rng = np.random.default_rng(0)
    c = 1000
    z = rng.uniform(-S, S, (6, c)).astype(np.float32)
    labels = np.array([0, 1, 2, 3, 4, 5])
    z[1] = S  # every class at the bound, the target too
    z[2] = S
    z[2, 2] = -1.24 * S  # target at ArcFace's guarded minimum, all others at the top
    z[3] = -S  # every class at the bottom
    z[3, 3] = -1.24 * S
    z[4, :500] = -1e4  # padded classes (their -1e4 bias)
    z[5] = rng.normal(0, 1, c).astype(np.float32)  # an untrained model's logits
    return z, labels


def test_loss_and_gradient_match_float64_numpy():
    z, labels = rows()
    logits = flow.tensor(z, requires_grad=True)
    glogits = logits.to_global(placement=parallel.placement("cpu"), sbp=parallel.SBP_LOGITS)
    glabels = flow.tensor(labels).to_global(placement=parallel.placement("cpu"), sbp=parallel.SBP_GATHERED)
    loss = class_split_cross_entropy(glogits, glabels)
    loss.backward()
    want_loss, want_grad = numpy_loss_and_grad(z, labels)
    assert np.isfinite(loss.numpy()).all()
    assert float(loss.numpy()) == pytest.approx(want_loss, rel=1e-6)
    np.testing.assert_allclose(logits.grad.numpy(), want_grad, rtol=1e-4, atol=1e-9)


def test_each_row_is_its_own_softmax():
    """Row by row (batch of one) gives the per-row losses whose mean is the batch loss."""
    z, labels = rows()
    place = parallel.placement("cpu")
    per_row = []
    for i in range(len(labels)):
        g = flow.tensor(z[i:i + 1]).to_global(placement=place, sbp=parallel.SBP_LOGITS)
        lab = flow.tensor(labels[i:i + 1]).to_global(placement=place, sbp=parallel.SBP_GATHERED)
        per_row.append(float(class_split_cross_entropy(g, lab).numpy()))
        assert per_row[-1] == pytest.approx(numpy_loss_and_grad(z[i:i + 1], labels[i:i + 1])[0], rel=1e-6, abs=1e-6)
    assert per_row[1] == pytest.approx(np.log(z.shape[1]), rel=1e-6)  # all logits equal: log C


def test_two_ranks_ten_thousand_classes_each(tmp_path):
    """20,480 classes on 2 ranks, extreme rows: graph and eager loss and the gradient vs numpy."""
    out = tmp_path / "ce.npz"
    launch([Path(__file__).parent / "workers" / "ce_split.py", out], nproc=2, timeout=600)
    f = np.load(out)
    want_loss, want_grad = numpy_loss_and_grad(f["z"], f["labels"])
    assert f["z"].shape[1] >= 20_000
    assert np.isfinite(f["eager"]).all() and np.isfinite(f["graph"]).all()
    assert float(f["eager"]) == pytest.approx(want_loss, rel=1e-6)
    assert float(f["graph"]) == pytest.approx(want_loss, rel=1e-6)
    np.testing.assert_allclose(f["grad"], want_grad, rtol=1e-4, atol=1e-9)
