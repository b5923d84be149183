"""kill -9 of one rank mid-training: the launcher prints the one `error: rank 1 was killed by
SIGKILL` line and nothing of the survivor's native abort (OneFlow's C++ `Check failure stack
trace`), exit code 1, and the run folder keeps no half-written file.

Three repetitions at different steps (bench/kill_rank.py measures ten: docs/BENCHMARKS.md). Before
the launcher held the ranks' stderr, 7 of 12 kills printed the stack trace; a test that kills
three times would have missed it (7/12)^3 = 20% of the time, so its failure is a real signal,
its pass a weaker one than the bench's ten.
"""
import sys
from pathlib import Path

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import kill_rank  # noqa: E402


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    return kill_rank.make_data(tmp_path_factory.mktemp("faces"))


@pytest.mark.parametrize("step", [3, 7, 12])
def test_kill_9_of_one_rank_prints_one_line(faces, tmp_path, step):
    out = tmp_path / "run"
    code, stderr, stdout = kill_rank.run_once(faces, out, step, rank=1, steps=60, timeout=240)
    ok, extra = kill_rank.clean(code, stderr, rank=1)
    assert ok, f"exit {code}, extra lines: {extra}\n{stderr[-3000:]}"
    assert f"step {step}/" in stdout
    left = [p.name for p in Path(out).rglob("*") if ".tmp" in p.name]
    assert not left, left
