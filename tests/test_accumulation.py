"""Gradient accumulation: k micro-batches per optimizer step == one batch of the same samples.

Without BatchNorm the mean gradient over k micro-batches of 16/k samples equals the gradient of
the 16-sample batch, so weights after 4 steps must match; this fails if the loss were not
divided by k (gradients k times larger) or if the LR schedule stepped per micro-batch (the
schedule here changes the LR at every step).
"""
import numpy as np
import pytest

from conftest import run_worker


@pytest.mark.parametrize("mode", ["graph", "eager"])
def test_accumulated_steps_equal_one_big_batch(tmp_path, mode):
    whole = run_worker("accum", tmp_path / "k1.json", extra=[mode, 1])
    accumulated = run_worker("accum", tmp_path / "k4.json", extra=[mode, 4])
    np.testing.assert_allclose(accumulated["losses"], whole["losses"], rtol=1e-5)
    np.testing.assert_allclose(accumulated["fc"], whole["fc"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(accumulated["linear"], whole["linear"], rtol=1e-4, atol=1e-6)
    assert whole["losses"][0] != whole["losses"][-1]  # it trained
