"""AMP's dynamic loss scale on 2 ranks: infinite inputs on one rank skip the step on both."""
import json

from conftest import REPO, launch


def test_nonfinite_gradient_on_one_rank_skips_the_step_everywhere(tmp_path):
    launch([REPO / "tests" / "workers" / "amp_skip.py", tmp_path / "amp"], nproc=2)
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
    assert ranks[0][2]["loss"] == ranks[1][2]["loss"]  # the ranks carry on in step
