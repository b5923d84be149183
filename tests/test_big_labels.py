"""Class ids above 2**24 train as themselves: 2 ranks, 2**24 + 8 classes, PartialFC with the sparse
update, labels 2**24+1, 2**24+2, ... that float32 would merge.

The worker (tests/workers/big_labels.py) returns the FC rows that changed in each step. Here a
float64 numpy computation redoes each step from the rows before it: the rows that changed are
exactly the kept ones (k per rank, every label among them), the step's loss is the softmax
cross-entropy of each sample against its own row, and each kept row moved by SGD momentum with
its own gradient.
"""
import numpy as np
import pytest

from conftest import run_worker

BIG = 2 ** 24
LR, MU, S, M3 = 0.1, 0.9, 4.0, 0.35


def loss_and_grad(w, x, y, kept):
    """Mean CosFace cross-entropy over the kept rows w [k, d] (ids `kept`, sorted) and its gradient
    with respect to w, in float64."""
    w, x = np.asarray(w, np.float64), np.asarray(x, np.float64)
    norm_w = np.linalg.norm(w, axis=1, keepdims=True)
    xh = x / np.linalg.norm(x, axis=1, keepdims=True)
    pos = np.searchsorted(kept, y)
    assert np.all(kept[pos] == y), "a label's own row was not kept"
    rows = np.arange(len(y))
    z = S * (xh @ (w / norm_w).T)
    z[rows, pos] -= S * M3
    z -= z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    loss = -logp[rows, pos].mean()
    p = np.exp(logp)
    p[rows, pos] -= 1.0
    d_what = S * p.T @ xh / len(y)
    w_hat = w / norm_w
    return loss, (d_what - w_hat * (d_what * w_hat).sum(1, keepdims=True)) / norm_w


# eager: `make test-all` only (the graph step is the one training uses; same checks)
@pytest.mark.parametrize("mode", ["graph", pytest.param("eager", marks=pytest.mark.slow)])
def test_class_ids_above_2_24_sample_and_train(tmp_path, mode):
    run = run_worker("big_labels", tmp_path / "run.json", extra=[mode], timeout=600)
    assert run["classes"] == BIG + 8
    velocity = {}
    for t, s in enumerate(run["steps"], 1):
        assert s["rows"] >= BIG + 8
        kept = np.array(s["changed"])
        y = np.array(s["y"])
        # exactly the kept rows moved: k per rank, never a padded row, every label's own row
        assert len(kept) == 2 * run["k"] and kept.max() < BIG + 8, f"step {t}: {len(kept)} rows changed"
        assert set(y.tolist()) <= set(kept.tolist()), f"step {t}: labels {y} not all among the changed rows"
        assert {BIG + 1, BIG + 2} & set(y.tolist()) <= set(kept.tolist())
        loss, grad = loss_and_grad(s["before"], s["x"], y, kept)
        assert s["loss"] == pytest.approx(loss, rel=1e-5), f"step {t}"
        v = np.array([MU * velocity.get(int(i), np.zeros(4)) for i in kept]) + grad
        velocity.update(zip(kept.tolist(), v))
        expected = np.asarray(s["before"], np.float64) - LR * v
        np.testing.assert_allclose(s["after"], expected, rtol=1e-4, atol=1e-6, err_msg=f"step {t}")
    # the neighbours a float32 label would have merged moved each by its own gradient: rows BIG+1
    # and BIG+2 of step 1 were pulled towards different features
    first = run["steps"][0]
    ids = list(first["changed"])
    moved = {i: np.subtract(first["after"][ids.index(i)], first["before"][ids.index(i)]) for i in (BIG + 1, BIG + 2)}
    assert not np.allclose(moved[BIG + 1], moved[BIG + 2], atol=1e-6)
