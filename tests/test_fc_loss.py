"""The model-parallel head: 2 ranks == 1 rank == a numpy softmax over margin logits."""
import numpy as np
import pytest

from conftest import run_worker


def numpy_loss(margin, scale=32.0):
    classes, dim, batch = 13, 16, 8
    rng = np.random.default_rng(0)
    w = rng.standard_normal((classes, dim)).astype(np.float64)
    x = rng.standard_normal((batch, dim)).astype(np.float64)
    y = rng.integers(0, classes, batch)
    cos = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T
    m1, m2, m3 = margin
    rows = np.arange(batch)
    theta = np.arccos(np.clip(cos[rows, y], -1, 1))
    logits = cos.copy()
    logits[rows, y] = np.cos(m1 * theta + m2) - m3
    logits *= scale
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -logp[rows, y].mean()


@pytest.mark.parametrize("margin", [(1.0, 0.5, 0.0), (1.0, 0.0, 0.4)], ids=["arcface", "cosface"])
def test_two_ranks_equal_one_rank_and_numpy(tmp_path, margin):
    arg = ",".join(map(str, margin))
    one = run_worker("fc_loss", tmp_path / "one.json", nproc=1, extra=[arg])
    two = run_worker("fc_loss", tmp_path / "two.json", nproc=2, extra=[arg])
    assert two["world"] == 2 and "split(dim=1)" in two["logits_sbp"]
    assert abs(two["loss"] - one["loss"]) <= 1e-5 * max(1.0, abs(one["loss"]))
    assert one["loss"] == pytest.approx(numpy_loss(margin), rel=1e-5)
    np.testing.assert_allclose(two["weight_grad"], one["weight_grad"], rtol=1e-4, atol=1e-6)
    assert two["pad_grad_max"] == 0.0  # padded centres never get a gradient
