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

from conftest import REPO, tiny, train_cmd

sys.path.insert(0, str(REPO / "bench"))
import kill_rank  # noqa: E402


@pytest.mark.parametrize("step", [3, 7, 12])
def test_kill_9_of_one_rank_prints_one_line(synthetic_faces, tmp_path, step):
    out = tmp_path / "run"
    # the tiny run through of_face.train.launch (what scripts/train_ddp.sh runs), long enough to be killed mid-way
    cmd = train_cmd(tiny(synthetic_faces(12, 4), out, "Data.batch_size=4", "Global.max_steps=60",
                         "Global.epochs=1000", "Global.log_interval=1", "Global.mode=graph"), launcher="of_face")
    code, stderr, stdout = kill_rank.kill_during(cmd, step, rank=1, timeout=240)
    ok, extra = kill_rank.clean(code, stderr, rank=1)
    assert ok, f"exit {code}, extra lines: {extra}\n{stderr[-3000:]}"
    assert f"step {step}/" in stdout
    left = [p.name for p in Path(out).rglob("*") if ".tmp" in p.name]
    assert not left, left
