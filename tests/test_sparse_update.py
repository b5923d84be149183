"""SparseMomentum: with PartialFC only the kept class centres and their optimizer state change.

The worker trains the sampled head alone (identity backbone) for three steps on 2 ranks and
returns the full FC weight after every step. Here numpy redoes each update from the rows that
changed: softmax cross-entropy over the kept centres, CosFace margin, then SGD momentum
(v = mu*v + g + wd*w; w -= lr*v) or PLSC's AdamW (plsc/optimizer/adamw.py: Paddle's adamw kernel
on the gathered rows with beta^t from the optimizer step t, i.e. decoupled decay and bias
correction from the global step), kept rows only, state of other rows carried over.
"""
import numpy as np
import pytest

from conftest import run_worker

LR, MU, WD, S, M3 = 0.1, 0.9, 0.01, 16.0, 0.35
BETAS, EPS = (0.9, 0.999), 1e-8


def fc_grad(w, x, y, kept):
    """d(mean CE)/dw over the kept rows of w (float64), CosFace logits s*(cos - m3 at the label)."""
    wk = w[kept].astype(np.float64)
    norm_w = np.linalg.norm(wk, axis=1, keepdims=True)
    xh = x / np.linalg.norm(x, axis=1, keepdims=True)
    cos = xh @ (wk / norm_w).T
    pos = np.searchsorted(kept, y)
    assert np.all(kept[pos] == y), "a positive class was not kept"
    z = S * cos
    z[np.arange(len(y)), pos] -= S * M3
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), pos] -= 1.0
    d_what = S * p.T @ xh / len(y)  # d/d(w_hat)
    w_hat = wk / norm_w
    return (d_what - w_hat * (d_what * w_hat).sum(1, keepdims=True)) / norm_w


def plsc_adamw(w, m, v, t):
    """PLSC's sparse AdamW row update (Paddle's adamw kernel, lr_ratio 1, beta pows from step t):
    p -= lr*coeff*p; p -= lr*sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + eps*sqrt(1-b2^t))."""
    b1, b2 = BETAS
    lr_t = LR * np.sqrt(1 - b2 ** t) / (1 - b1 ** t)
    return w - LR * WD * w - lr_t * m / (np.sqrt(v) + EPS * np.sqrt(1 - b2 ** t))


def replay(run, optimizer, atol=1e-5):
    """Numpy's weights after each step, given the rows the run kept; asserts exact carry-over."""
    W = np.array(run["weights"], np.float64)
    state = {"v": np.zeros_like(W[0]), "m": np.zeros_like(W[0]), "s": np.zeros_like(W[0])}
    for t in range(1, len(W)):
        kept = np.flatnonzero(np.any(W[t] != W[t - 1], axis=1))
        # other rows: bit-for-bit the previous weight (their momentum is checked by later steps)
        assert len(kept) == 2 * run["k"]  # k per rank
        # a kept padded row (its position is a real class on the other rank) only decays: its
        # logit carries the -1e4 bias, so it takes no part in the softmax and gets no gradient
        kept = kept[kept < run["classes"]]
        assert set(run["y"][t - 1]) <= set(kept)
        w, g = W[t - 1][kept], fc_grad(W[t - 1], np.array(run["x"][t - 1]), np.array(run["y"][t - 1]), kept)
        if optimizer == "sgd":
            state["v"][kept] = MU * state["v"][kept] + g + WD * w
            expected = w - LR * state["v"][kept]
        else:
            b1, b2 = BETAS
            state["m"][kept] = b1 * state["m"][kept] + (1 - b1) * g
            state["s"][kept] = b2 * state["s"][kept] + (1 - b2) * g * g
            expected = plsc_adamw(w, state["m"][kept], state["s"][kept], t)
        rtol = 2e-4 if atol >= 1e-5 else 0.0
        np.testing.assert_allclose(W[t][kept], expected, rtol=rtol, atol=atol, err_msg=f"step {t}")
    return W


@pytest.mark.parametrize("mode,optimizer", [("graph", "sgd"), ("graph", "adamw"), ("onejob", "sgd"),
                                            ("onejob", "adamw"), ("eager", "sgd"), ("eager", "adamw")])
def test_only_kept_rows_and_their_state_change(tmp_path, mode, optimizer):
    run = run_worker("sparse_update", tmp_path / "run.json", extra=[mode, optimizer, 1])
    W = replay(run, optimizer)
    # the momentum carried by rows kept at step 1, skipped at step 2, kept again at step 3 made
    # the numpy replay of step 3 match: an unsampled row's state neither decayed nor moved
    k1, k2, k3 = (set(np.flatnonzero(np.any(W[t] != W[t - 1], 1))) for t in (1, 2, 3))
    assert (k1 - k2) & k3
    if mode == "graph":  # the update compiled to the sparse kernel; no dense FC gradient is summed
        update = "indexed_slices_momentum_update" if optimizer == "sgd" else "indexed_slices_adam_update"
        assert update in run["ops"][0] and "unsorted_segment_sum_like" not in run["ops"][0]


@pytest.mark.parametrize("mode", ["graph", "onejob", "eager"])
def test_sparse_adamw_replays_plsc_over_five_steps(tmp_path, mode):
    """Bias correction from the global step, as PLSC: 5 steps to 1e-6 (the first steps' updates
    are ~3x smaller than uncorrected Adam's, so a missing correction fails at step 1)."""
    run = run_worker("sparse_update", tmp_path / "run.json", extra=[mode, "adamw", 1, 0, 5])
    assert len(run["weights"]) == 6
    replay(run, "adamw", atol=1e-6)


def test_dense_update_moves_every_row(tmp_path):
    """The config switch back to dense updates: weight decay and momentum reach unsampled rows."""
    run = run_worker("sparse_update", tmp_path / "dense.json", extra=["graph", "sgd", 0])
    W = np.array(run["weights"])
    assert np.all(np.any(W[2][:61] != W[1][:61], axis=1))
    assert "momentum_update" in run["ops"][0] and "indexed_slices_momentum_update" not in run["ops"][0]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_amp_keeps_the_update_sparse(tmp_path, optimizer):
    """AMP + sparse (train/amp_sparse.py): the FC update runs in its own FP32 job, compiled to the
    sparse kernel; only kept rows and their state change, and the numpy replay holds (SGD
    momentum, PLSC's AdamW bias correction) as without AMP."""
    run = run_worker("sparse_update", tmp_path / "run.json", extra=["graph", optimizer, 1, 1])
    W = replay(run, optimizer)
    k1, k2, k3 = (set(np.flatnonzero(np.any(W[t] != W[t - 1], 1))) for t in (1, 2, 3))
    assert (k1 - k2) & k3
    update = "indexed_slices_momentum_update" if optimizer == "sgd" else "indexed_slices_adam_update"
    train_job, fc_job = run["ops"]
    updates = {"sgd_update", "momentum_update", "adam_update", update}
    assert update in fc_job and not updates & set(train_job)  # (the identity backbone: nothing else to train)


def test_amp_with_sparse_updates_is_accepted():
    """The zoo's FP16 configs run SparseMomentum (PLSC: fp16 O1 + sparse_update)."""
    from of_face.config import load_config

    cfg = load_config("configs/default.yaml", ["Loss.sample_rate=0.1", "AMP.enable=true"])
    assert cfg.AMP.enable and cfg.Optimizer.sparse_fc_update
