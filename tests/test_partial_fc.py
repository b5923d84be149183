"""PartialFC: sampling inside nn.Graph on 2 ranks, and the sampled loss/gradient against numpy."""
import numpy as np
import pytest
from scipy.stats import chisquare

from conftest import run_worker

CLASSES, RATE = 21, 0.5


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return run_worker("pfc_sample", tmp_path_factory.mktemp("pfc") / "out.json", nproc=2)


def kept_classes(index, local, world=2):
    """Kept positions J [k] (the same on every rank) -> the kept classes in logit-column order:
    rank r's class r*local + J[j] is column r*k + j."""
    return np.concatenate([r * local + np.asarray(index) for r in range(world)])


def test_every_positive_is_kept_and_labels_are_remapped(result):
    k, local = result["k"], result["local"]
    assert (k, local) == (6, 11)  # ceil(0.5 * 11)
    for s in result["steps"]:
        assert len(set(s["index"])) == k and all(0 <= j < local for j in s["index"])
        kept = kept_classes(s["index"], local)
        for label, new in zip(s["labels"], s["remapped"]):
            assert label in kept
            assert kept[new] == label  # the remapped label indexes the true centre


def test_negatives_are_uniform_over_the_other_positions(result):
    """Besides the positives' positions, the k - |P| kept positions are a uniform draw from the
    local - |P| others: each position's count as a negative matches its expectation."""
    k, local = result["k"], result["local"]
    counts, expected = np.zeros(local), np.zeros(local)
    for s in result["steps"]:
        positives = {label % local for label in s["labels"]}
        others = [q for q in range(local) if q not in positives]
        for q in s["index"]:
            counts[q] += q not in positives
        expected[others] += (k - len(positives)) / len(others)
    assert counts.sum() == pytest.approx(expected.sum())
    free = expected > 0  # (positions 0 and 1 hold positives at every step)
    assert counts[~free].sum() == 0 and free.sum() == local - 2
    assert chisquare(counts[free], expected[free]).pvalue > 1e-3


def test_sampled_loss_and_gradient_match_numpy(result):
    local, s, m3 = result["local"], 16.0, 0.35
    w = np.asarray(result["weight"], np.float64)
    x = np.asarray(result["emb"], np.float64)
    y = np.asarray(result["labels"])
    kept = kept_classes(result["index"], local)
    assert np.array_equal(kept[np.asarray(result["remapped"])], y)
    assert CLASSES in kept  # the worker keeps the padded class 21's position (10): it must stay out
    ws = w[kept]
    wn = ws / np.linalg.norm(ws, axis=1, keepdims=True)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    cos = xn @ wn.T
    onehot = np.zeros_like(cos)
    onehot[np.arange(len(y)), result["remapped"]] = 1
    logits = s * (cos - m3 * onehot)
    logits[:, kept >= CLASSES] = -np.inf  # padded classes (their -1e4 bias): probability exactly 0
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
    assert np.abs(grad[CLASSES:]).max() == 0.0
