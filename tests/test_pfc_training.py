"""PartialFC sampling compiled into the training graph on 2 ranks."""
import numpy as np

from conftest import run_worker


def test_partial_fc_trains_inside_the_graph(tmp_path):
    # 101 classes on 2 ranks: 51 per rank, r = 0.5 keeps 26 per rank (>= the global batch of 16)
    full = run_worker("train_steps", tmp_path / "full.json", nproc=2, extra=["graph", 4, 1.0, 101])
    sampled = run_worker("train_steps", tmp_path / "pfc.json", nproc=2, extra=["graph", 4, 0.5, 101])
    again = run_worker("train_steps", tmp_path / "pfc2.json", nproc=2, extra=["graph", 4, 0.5, 101])
    assert np.all(np.isfinite(sampled["losses"]))
    # same weights and batch: a softmax over a subset that holds the positive has a smaller
    # denominator, so the first sampled loss is strictly below the full one
    assert sampled["losses"][0] < full["losses"][0]
    assert sampled == again  # the sampling is seeded: runs repeat exactly
    assert sampled["losses"] != full["losses"]
