"""AMP's dynamic loss scale on 2 ranks: infinite inputs on one rank skip the step on both."""
import json

import numpy as np
import pytest

from conftest import REPO, launch


@pytest.mark.parametrize("sparse", [0, 1])
def test_nonfinite_gradient_on_one_rank_skips_the_step_everywhere(tmp_path, sparse):
    """Also with sparse FC updates, whose update runs in a second job (train/amp_sparse.py)."""
    launch([REPO / "tests" / "workers" / "amp_skip.py", tmp_path / "amp", sparse], nproc=2)
    ranks = [json.loads((tmp_path / f"amp.{r}.json").read_text()) for r in (0, 1)]
    for rank, steps in enumerate(ranks):
        first, bad, after = steps
        # a normal step moves the backbone copy and this rank's FC shard (the last entry) ...
        assert first["changed"][-1] and sum(first["changed"]) > len(first["changed"]) // 2
        # ... the step with rank 1's infinite images changes nothing on either rank
        assert not any(bad["changed"])
        assert after["changed"][-1] and sum(after["changed"]) > len(after["changed"]) // 2
        # the scale (a rank-0 variable) starts at init_scale=1024, halves on the skipped step and
        # stays (growth every 2000 good steps)
        assert [s["scale"] for s in steps] == ([1024.0, 512.0, 512.0] if rank == 0 else [None] * 3)
        if sparse:  # the FC job skipped step 2 and still gave step 3 the schedule's step index
            assert [s["fc_job_step"] for s in steps] == ([1, 1, 3] if rank == 0 else [None] * 3)
    assert ranks[0][2]["loss"] == ranks[1][2]["loss"]  # the ranks carry on in step


def test_sparse_fc_update_under_amp_removes_the_loss_scale(tmp_path):
    """AMP + sparse: after step 1 (loss scale 1024) the FC equals the same run's without AMP (on
    CPU OneFlow's AMP computes in FP32, so only the scaling can differ: a scale left in, or
    applied twice, moves the kept rows 1024 times too far), and unsampled rows stay put."""
    for amp in (1, 0):
        launch([REPO / "tests" / "workers" / "amp_skip.py", tmp_path / f"amp{amp}", 1, amp], nproc=2)
    with_amp, without = (json.loads((tmp_path / f"amp{a}.0.json").read_text()) for a in (1, 0))
    assert with_amp[0]["scale"] == 1024.0 and without[0]["scale"] is None
    fc_amp, fc = np.array(with_amp[0]["fc"]), np.array(without[0]["fc"])
    np.testing.assert_allclose(fc_amp, fc, rtol=1e-4, atol=1e-6)
    # unsampled rows bit-identical, the same k per rank moved in both runs (kept rows decay too)
    moved = [np.any(np.array(run[0]["fc"]) != np.array(run[0]["fc0"]), axis=1) for run in (with_amp, without)]
    assert moved[0].sum() == 2 * with_amp[0]["k"] < len(fc) and np.array_equal(moved[0], moved[1])
