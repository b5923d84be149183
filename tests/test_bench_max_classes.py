"""bench/fc_max_classes.py without OneFlow: the bisection on fake trials, and the memory watchdog on
real child processes that allocate (a tree of them, like a 2-rank launch)."""
import importlib.util
import json
import math
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20


def _load():
    spec = importlib.util.spec_from_file_location("fc_max_classes", REPO / "bench" / "fc_max_classes.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


mc = _load()


def fake(limit, fail_above=None, calls=None):
    """A trial that runs up to `limit` classes, goes over budget above, and fails outright above
    `fail_above` (a crash that says nothing about memory)."""
    def trial(classes):
        if calls is not None:
            calls.append(classes)
        if fail_above is not None and classes > fail_above:
            return mc.Trial(classes, "failed", detail="exit 1, 0 JSON lines: boom")
        if classes <= limit:
            return mc.Trial(classes, "ok", 10 * classes, 1.0, 2.0)
        return mc.Trial(classes, "over budget", 10 * classes)
    return trial


@pytest.mark.parametrize("limit", [1_234_567, 4_600_000, 150_001, 22_999_000])
def test_bisection_brackets_the_true_limit_within_the_resolution(limit):
    hi = mc.bytes_bound(24 * 2**30, 128)  # 25,165,000
    calls = []
    s = mc.search(fake(limit, calls=calls), 0, hi, resolution=0.02, resolution_classes=100_000)
    assert s.stopped is None
    assert s.lo <= limit < s.hi
    assert s.hi - s.lo <= max(0.02 * s.hi, 100_000)
    assert s.largest.classes == s.lo and s.largest.outcome == "ok"
    assert s.smallest_over is None or (s.smallest_over.classes == s.hi and s.smallest_over.outcome == "over budget")
    assert len(calls) == len(set(calls)) <= math.ceil(math.log2(hi / 100_000))  # bisection, no repeats
    assert all(c % 1000 == 0 for c in calls)


def test_limit_above_every_trial_keeps_the_unrun_bound():
    s = mc.search(fake(10**9), 0, 1_000_000, resolution=0.0, resolution_classes=100_000)
    assert s.smallest_over is None and s.hi == 1_000_000 and 900_000 <= s.lo < 1_000_000
    assert "1,000,000 (bytes bound, not run)" in mc.table_row(128, s, 2**30, "now")


def test_a_non_memory_failure_stops_the_search():
    calls = []
    # the first trial (12.5M) runs, the second (18.75M) crashes: nothing is tried after it
    s = mc.search(fake(20_000_000, fail_above=15_000_000, calls=calls), 0, 25_000_000)
    assert calls == [12_500_000, 18_750_000]
    assert s.stopped.classes == 18_750_000 and s.stopped.outcome == "failed" and "boom" in s.stopped.detail
    assert s.largest.classes == 12_500_000 and s.smallest_over is None
    assert "stopped: 18,750,000 exit 1, 0 JSON lines: boom" in mc.table_row(512, s, 2**30, "now")


def test_bytes_bound_is_weight_plus_momentum_over_the_budget():
    assert mc.bytes_bound(4096 * 100_000, 512) == 100_000  # 2 * 512 * 4 = 4096 bytes per class
    assert mc.bytes_bound(3 * 2**30, 128) == 3 * 2**30 // 1024 // 1000 * 1000


# A parent that spawns 2 "ranks"; each prints its pid, then holds `each` MiB of touched memory (the
# repeated 1 byte writes every page, unlike a zeroed bytearray) and sleeps. The parent waits. -S:
# the venv's site hook preloads the CUDA libraries (~130 MiB per interpreter), not wanted here.
TREE = textwrap.dedent("""
    import subprocess, sys
    rank = ("import os, time; os.write(1, b'%d\\\\n' % os.getpid()); "
            "b = bytearray(b'\\\\1') * ({each} << 20); time.sleep(60)")
    ranks = [subprocess.Popen([sys.executable, "-S", "-c", rank]) for _ in range(2)]
    [r.wait() for r in ranks]
""")


def _alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_watchdog_kills_the_whole_tree_when_its_summed_rss_passes_the_budget():
    # (each rank writes its pid in one write(2): print's text and newline can interleave between ranks)
    # each rank alone (150 MiB) stays under the 250 MiB budget: only the sum over the tree exceeds it
    start = time.monotonic()
    w = mc.watch([sys.executable, "-S", "-c", TREE.format(each=150)], 250 * MIB, interval=0.05, timeout=30)
    assert w.killed == "over budget" and w.returncode < 0
    assert 250 * MIB < w.peak_bytes < 400 * MIB
    assert time.monotonic() - start < 10  # killed, not timed out
    pids = [int(p) for p in w.stdout.split()]
    assert len(pids) == 2  # both ranks printed before allocating, so before the sum could pass
    deadline = time.monotonic() + 3
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids), "a rank survived the kill"


def test_watchdog_lets_a_tree_under_budget_finish_and_measures_its_peak():
    code = "b = bytearray(b'\\1') * (120 << 20); import time; time.sleep(0.5); print('done')"
    w = mc.watch([sys.executable, "-S", "-c", code], 1024 * MIB, interval=0.05, timeout=30)
    assert w.killed == "" and w.returncode == 0 and w.stdout.strip() == "done"
    assert 120 * MIB < w.peak_bytes < 400 * MIB  # the 120 MiB fill was seen, within the interpreter's own


def test_watchdog_stops_a_trial_when_the_machine_runs_low():
    w = mc.watch([sys.executable, "-S", "-c", "import time; time.sleep(30)"], 1024 * MIB, interval=0.05,
                 min_available=10 * MIB, available=lambda: MIB)
    assert w.killed == "low memory" and w.returncode < 0 and w.seconds < 10


def test_run_trial_reports_a_crash_with_its_last_stderr_line(monkeypatch):
    def crashed(cmd, budget, **kw):
        assert cmd[-6:] == ["bench/fc_part.py", "300000", "0.1", "1", "128", "256"] and kw["env"]["FC_STEPS"] == "3"
        return mc.Watched(1, '{"rank": 0}\n', "Traceback\nValueError: bad\n", 5 * MIB, "", 1.0)
    monkeypatch.setattr(mc, "watch", crashed)
    t = mc.run_trial(300_000, 128, 2**30)
    assert t.outcome == "failed" and t.detail == "exit 1, 1 JSON lines: ValueError: bad"

    rank = {"s_per_step": 1.5, "peak_rss_gib": 0.7}
    ok = "\n".join(json.dumps(dict(rank, rank=r, s_per_step=1.5 + r)) for r in range(2))
    monkeypatch.setattr(mc, "watch", lambda cmd, budget, **kw: mc.Watched(0, ok, "", 3 * MIB, "", 9.0))
    t = mc.run_trial(300_000, 128, 2**30)
    assert (t.outcome, t.s_per_step, t.rank_rss_gib) == ("ok", 2.5, 0.7)
    monkeypatch.setattr(mc, "watch", lambda cmd, budget, **kw: mc.Watched(-9, "", "", 3 * MIB, "over budget", 9.0))
    assert mc.run_trial(300_000, 128, 2**30).outcome == "over budget"


def test_run_trial_passes_fc_chunks_and_reads_interleaved_rank_lines(monkeypatch):
    # print writes text and newline apart: the two ranks' lines can land on one line; K and the
    # prediction come back with the trial
    one = '{"rank": 0, "s_per_step": 2.0, "peak_rss_gib": 9.5, "fc_chunks": 32, "predicted_gib": 9.4}'
    two = '{"rank": 1, "s_per_step": 2.5, "peak_rss_gib": 9.6, "fc_chunks": 32, "predicted_gib": 9.4}'

    def ran(cmd, budget, **kw):
        assert kw["env"]["FC_CHUNKS"] == "auto" and kw["env"]["FC_MEMORY_GIB"] == "10.5"
        return mc.Watched(0, one + two + "\n\n", "", 3 * MIB, "", 9.0)
    monkeypatch.setattr(mc, "watch", ran)
    t = mc.run_trial(4_600_000, 512, 2**30, fc_chunks="auto", fc_memory_gib=10.5)
    assert (t.outcome, t.s_per_step, t.rank_rss_gib, t.fc_chunks, t.predicted_gib) == ("ok", 2.5, 9.6, 32, 9.4)
    assert "K 32, predicted 9.40 GiB/rank" in mc.describe(512, t)


def test_a_size_auto_refuses_counts_as_over_budget_not_as_a_failure(monkeypatch):
    err = ("error: Loss.fc_memory_gib: the FC head of 6000000 classes x 512 needs a predicted 12.90 GiB per rank "
           "even in 64 chunks, over the budget of 10.50 GiB; raise Loss.fc_memory_gib, ...\n")
    monkeypatch.setattr(mc, "watch", lambda cmd, budget, **kw: mc.Watched(1, "", err, 3 * MIB, "", 5.0))
    t = mc.run_trial(6_000_000, 512, 2**30, fc_chunks="auto", fc_memory_gib=10.5)
    assert t.outcome == "over budget" and t.predicted_gib == 12.9 and "refused by auto" in t.detail
