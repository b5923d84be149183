"""Global.pin_cpus: on CPU, each local rank's threads keep to their own block of the CPUs
(parallel.pin_local_cpus), through the real 2-rank launcher; false leaves them to the OS."""
import json
import os

import pytest

from conftest import launch, REPO


def affinities(tmp_path, pin):
    out = tmp_path / f"pin-{pin}.json"
    launch([REPO / "tests" / "workers" / "pinned_cpus.py", out, pin], nproc=2, timeout=180)
    return [json.loads(open(f"{out}.{r}").read()) for r in (0, 1)]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs for 2 ranks")
def test_each_rank_keeps_to_its_own_block(tmp_path):
    ranks = affinities(tmp_path, "true")
    allowed = ranks[0]["before"]
    per = len(allowed) // 2
    for r, rank in enumerate(ranks):
        block = allowed[r * per:(r + 1) * per]  # block r of 2 equal blocks of the allowed CPUs
        assert rank["threads"] and all(cpus == block for cpus in rank["threads"].values()), (r, rank["threads"])


def test_false_leaves_the_threads_to_the_os(tmp_path):
    for rank in affinities(tmp_path, "false"):
        assert all(cpus == rank["before"] for cpus in rank["threads"].values())
