"""PartialFC: sampling inside nn.Graph on 2 ranks, and the sampled loss/gradient against numpy."""
import numpy as np
import pytest
from scipy.stats import chisquare

from conftest import run_worker

CLASSES, RATE = 21, 0.5


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return run_worker("pfc_sample", tmp_path_factory.mktemp("pfc") / "out.json", nproc=2)


def kept_classes(index, local):
    return [r * local + np.asarray(row) for r, row in enumerate(index)]


def test_every_positive_is_kept_and_labels_are_remapped(result):
    k, local = result["k"], result["local"]
    assert (k, local) == (6, 11)  # ceil(0.5 * 11)
    for s in result["steps"]:
        kept = np.concatenate(kept_classes(s["index"], local))
        assert len(set(kept.tolist())) == 2 * k
        for label, new in zip(s["labels"], s["remapped"]):
            assert label in kept
            assert kept[new] == label  # the remapped label indexes the true centre


def test_padded_class_never_kept_and_negatives_uniform(result):
    local = result["local"]
    counts = np.zeros(2 * local, int)
    for s in result["steps"]:
        for cls in np.concatenate(kept_classes(s["index"], local)):
            counts[cls] += 1
    assert counts[CLASSES:].sum() == 0  # class 21 is padding
    # rank 1 (classes 11..20) keeps 6 of its 10 real classes; positives there are rare and
    # random, so among steps without a rank-1 positive every class is kept with p = 0.6
    plain = [s for s in result["steps"] if max(s["labels"]) < local]
    c = np.zeros(10, int)
    for s in plain:
        c[np.asarray(s["index"][1])] += 1
    assert chisquare(c).pvalue > 1e-3 and abs(c.sum() / len(plain) - 6) < 1e-9


def test_sampled_loss_and_gradient_match_numpy(result):
    local, s, m3 = result["local"], 16.0, 0.35
    w = np.asarray(result["weight"], np.float64)
    x = np.asarray(result["emb"], np.float64)
    y = np.asarray(result["labels"])
    kept = np.concatenate(kept_classes(result["index"], local))
    assert np.array_equal(kept[np.asarray(result["remapped"])], y)
    ws = w[kept]
    wn = ws / np.linalg.norm(ws, axis=1, keepdims=True)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    cos = xn @ wn.T
    onehot = np.zeros_like(cos)
    onehot[np.arange(len(y)), result["remapped"]] = 1
    logits = s * (cos - m3 * onehot)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    loss = -np.log(p[onehot == 1]).mean()
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    # dL/dW for the kept rows through the normalisation; all other rows get exactly 0
    d_cos = s * (p - onehot) / len(y)
    d_wn = d_cos.T @ xn
    norms = np.linalg.norm(ws, axis=1, keepdims=True)
    d_ws = (d_wn - wn * (d_wn * wn).sum(1, keepdims=True)) / norms
    grad = np.asarray(result["grad"])
    np.testing.assert_allclose(grad[kept], d_ws, rtol=1e-4, atol=1e-6)
    others = np.setdiff1d(np.arange(len(grad)), kept)
    assert np.abs(grad[others]).max() == 0.0
