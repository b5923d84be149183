"""Issue 12 item 7: the largest class count the FC part runs at r 0.1 with the sparse update, 2 ranks.

    python bench/fc_max_classes.py [--dims 512 128] [--budget-gib G] [--resolution 0.02]
                                   [--resolution-classes 100000] [--steps 3] [--fc-chunks auto] [--fc-memory-gib G]

For each embedding size it bisects the class count C for which
`FC_STEPS=3 FC_CHUNKS=K FC_MEMORY_GIB=G python -m oneflow.distributed.launch --nproc_per_node 2
bench/fc_part.py C 0.1 1 DIM 256` completes. K and G default to the environment's FC_CHUNKS (else 1:
the one compiled step) and FC_MEMORY_GIB; with K = auto and no G, G is the watchdog's budget less
the launcher's share, over the ranks, less 3 % (the prediction falls short of the measured peak by
up to 3 % at these sizes, docs/BENCHMARKS.md P2d), so that auto (heads/memory.py) picks the
smallest K predicted to fit the watchdog's budget; a C that auto refuses (no K predicted to fit:
its ConfigError names Loss.fc_memory_gib) counts as over budget without running. The largest C
that runs at all is searched with K = 64 (auto's largest: the least memory), and the K that auto
picks is checked at that size with FC_CHUNKS=auto.

Every trial is its own launch in its own process group (session). A watchdog in this process sums
the RSS of the trial's whole process tree (from /proc: psutil is not a project dependency) every
0.2 s and kills the group once the sum passes the budget (default: MemAvailable
at start minus 1.5 GiB). A trial that is too big therefore never reaches the kernel OOM killer, which
could pick another process on a shared box. Such a trial is "over budget"; any other failure (exit
code, missing JSON, timeout, the machine itself running low on memory) stops the search, since it
says nothing about the size. The search starts from the bytes bound: the FC weight and its momentum
alone (2 * C * dim * 4 bytes over both ranks) fill the budget there. Summed RSS counts the pages the
ranks share (libraries) twice, so the budget errs on the safe side.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

GIB = 2**30
REPO = Path(__file__).resolve().parents[1]
PAGE = os.sysconf("SC_PAGE_SIZE")
WORLD = 2
LAUNCHER_GIB = 0.4  # RSS of oneflow.distributed.launch itself (it imports OneFlow), part of the summed RSS
PREDICTION_MARGIN = 0.03  # auto's per-rank budget below the watchdog's share: the prediction's error
REFUSED = "Loss.fc_memory_gib"  # auto's ConfigError when no K is predicted to fit (heads/memory.py)


def meminfo() -> dict:
    """/proc/meminfo in bytes ({"MemTotal": ..., "MemAvailable": ...})."""
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":", 1)
        out[key] = int(value.split()[0]) * 1024
    return out


def processes() -> dict:
    """{pid: (ppid, process group, RSS bytes)} of every live process."""
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # exited meanwhile
            continue
        fields = stat[stat.rindex(b")") + 2:].split()  # after "(comm)", which may hold spaces
        out[int(entry.name)] = (int(fields[1]), int(fields[2]), int(fields[21]) * PAGE)
    return out


def tree(root: int, procs: dict) -> set:
    """root, its descendants and every member of its process group (a rank whose parent died and
    was re-parented to init still counts, and still gets killed)."""
    children: dict = {}
    for pid, (ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    found |= {pid for pid, (_, group, _) in procs.items() if group == root}
    return found & procs.keys()


def kill_tree(root: int, pids: set) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    try:
        os.killpg(root, signal.SIGKILL)  # also whatever the group spawned since the last sample
    except OSError:
        pass


@dataclass
class Watched:
    returncode: int
    stdout: str
    stderr: str
    peak_bytes: int  # summed RSS of the tree, max over samples
    killed: str  # "" (ran to its end), "over budget", "low memory" or "timeout"
    seconds: float


def watch(cmd: list, budget_bytes: int, *, interval: float = 0.2, timeout: float | None = None,
          min_available: int = 0, available: Callable[[], int] = lambda: meminfo()["MemAvailable"],
          cwd=None, env=None) -> Watched:
    """Runs cmd in a new session and kills its whole tree when the summed RSS passes budget_bytes,
    when the machine's MemAvailable drops below min_available, or after timeout seconds."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:  # files: no pipe to drain
        start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, start_new_session=True)
        peak, killed = 0, ""
        try:
            while proc.poll() is None:
                procs = processes()
                pids = tree(proc.pid, procs)
                peak = max(peak, sum(procs[p][2] for p in pids))
                if peak > budget_bytes:
                    killed = "over budget"
                elif min_available and available() < min_available:
                    killed = "low memory"
                elif timeout and time.monotonic() - start > timeout:
                    killed = "timeout"
                if killed:
                    kill_tree(proc.pid, pids)
                    break
                time.sleep(interval)
        except BaseException:  # Ctrl-C: never leave a half-run trial behind
            kill_tree(proc.pid, tree(proc.pid, processes()))
            raise
        finally:
            proc.wait()
            kill_tree(proc.pid, set())  # a rank outliving its launcher
        seconds = time.monotonic() - start
        out.seek(0)
        err.seek(0)
        return Watched(proc.returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace"),
                       peak, killed, seconds)


@dataclass
class Trial:
    classes: int
    outcome: str  # "ok", "over budget" or "failed"
    peak_bytes: int = 0  # summed RSS of the launch's tree
    s_per_step: float | None = None  # max over ranks
    rank_rss_gib: float | None = None  # ru_maxrss, max over ranks
    detail: str = ""
    seconds: float = 0.0
    fc_chunks: int | None = None  # the K run
    predicted_gib: float | None = None  # heads/memory.py's peak per rank for it


def rank_lines(stdout: str) -> list:
    """The ranks' JSON lines (their writes may interleave on one line)."""
    return [json.loads(m) for m in re.findall(r"\{[^{}]*\}", stdout) if '"rank"' in m]


def run_trial(classes: int, dim: int, budget_bytes: int, *, rate: float = 0.1, batch: int = 256, steps: int = 3,
              timeout: float | None = None, min_available: int = 0, interval: float = 0.2, fc_chunks: str = "1",
              fc_memory_gib: float = 0.0) -> Trial:
    cmd = [sys.executable, "-m", "oneflow.distributed.launch", "--nproc_per_node", str(WORLD),
           "--master_port", str(29000 + random.randrange(900)),
           "bench/fc_part.py", str(classes), str(rate), "1", str(dim), str(batch)]
    env = dict(os.environ, FC_STEPS=str(steps), FC_CHUNKS=str(fc_chunks), FC_MEMORY_GIB=str(fc_memory_gib))
    w = watch(cmd, budget_bytes, interval=interval, timeout=timeout, min_available=min_available, cwd=REPO, env=env)
    if w.killed == "over budget":
        return Trial(classes, "over budget", w.peak_bytes, seconds=w.seconds)
    ranks = rank_lines(w.stdout)
    if not w.killed and w.returncode != 0 and REFUSED in w.stderr:  # auto: no K predicted to fit
        line = next(x for x in w.stderr.splitlines() if REFUSED in x)
        predicted = re.search(r"needs a predicted ([0-9.]+) GiB", line)
        return Trial(classes, "over budget", w.peak_bytes, detail="refused by auto (predicted)", seconds=w.seconds,
                     predicted_gib=float(predicted.group(1)) if predicted else None)
    if w.killed or w.returncode != 0 or len(ranks) < WORLD:
        last = (w.stderr.strip().splitlines() or ["(no stderr)"])[-1][:200]
        why = f"killed: {w.killed}" if w.killed else f"exit {w.returncode}, {len(ranks)} JSON lines"
        return Trial(classes, "failed", w.peak_bytes, detail=f"{why}: {last}", seconds=w.seconds)
    return Trial(classes, "ok", w.peak_bytes, max(r["s_per_step"] for r in ranks),
                 max(r["peak_rss_gib"] for r in ranks), seconds=w.seconds, fc_chunks=ranks[0].get("fc_chunks"),
                 predicted_gib=ranks[0].get("predicted_gib"))


def bytes_bound(budget_bytes: int, dim: int, granularity: int = 1000) -> int:
    """Classes whose FC weight + momentum alone (fp32, over all ranks) fill the budget: cannot run."""
    return budget_bytes // (2 * dim * 4) // granularity * granularity


@dataclass
class Search:
    largest: Trial | None  # largest count that ran (None: none tried ran)
    smallest_over: Trial | None  # smallest count over budget (None: only the bound, not run)
    lo: int
    hi: int  # smallest count known or assumed not to fit
    stopped: Trial | None  # the trial that failed for another reason, if any
    trials: list


def search(trial: Callable[[int], Trial], lo: int, hi: int, *, resolution: float = 0.02,
           resolution_classes: int = 100_000, granularity: int = 1000,
           report: Callable[[Trial], None] = lambda t: None) -> Search:
    """Bisects [lo, hi) where lo is taken to run (0, or a count known to run) and hi not to, until
    hi - lo <= max(resolution * hi, resolution_classes). Stops at the first trial that neither ran
    nor went over budget."""
    s = Search(None, None, lo, hi, None, [])
    while s.hi - s.lo > max(resolution * s.hi, resolution_classes):
        mid = round((s.lo + s.hi) / 2 / granularity) * granularity
        if not s.lo < mid < s.hi:
            break
        t = trial(mid)
        s.trials.append(t)
        report(t)
        if t.outcome == "ok":
            s.lo, s.largest = mid, t
        elif t.outcome == "over budget":
            s.hi, s.smallest_over = mid, t
        else:
            s.stopped = t
            break
    return s


def describe(dim: int, t: Trial) -> str:
    speed = f"{t.s_per_step:.2f} s/step, {t.rank_rss_gib:.2f} GiB/rank" if t.outcome == "ok" else ""
    if t.fc_chunks is not None:
        speed += f", K {t.fc_chunks}, predicted {t.predicted_gib:.2f} GiB/rank"
    return (f"dim {dim}: {t.classes:>12,} classes  {t.outcome:<11}  peak {t.peak_bytes / GIB:6.2f} GiB summed  "
            f"{speed}  ({t.seconds:.0f} s){'  ' + t.detail if t.detail else ''}")


def table_row(dim: int, s: Search, budget_bytes: int, stamp: str) -> str:
    largest = f"{s.largest.classes:,}" if s.largest else f"none above {s.lo:,}"
    if s.smallest_over:
        over = f"{s.smallest_over.classes:,} ({s.smallest_over.peak_bytes / GIB:.2f} GiB summed)"
    else:
        over = f"{s.hi:,} (bytes bound, not run)"
    rss = f"{s.largest.rank_rss_gib:.2f} GiB" if s.largest else "-"
    if s.largest and s.largest.fc_chunks is not None:
        rss += f" (K {s.largest.fc_chunks}, predicted {s.largest.predicted_gib:.2f})"
    if s.stopped:
        over += f"; stopped: {s.stopped.classes:,} {s.stopped.detail}"
    load = "%.2f %.2f %.2f" % os.getloadavg()
    return f"| {dim} | {largest} | {over} | {rss} | {budget_bytes / GIB:.2f} GiB | {load} | {stamp} |"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[512, 128], help="embedding sizes to search")
    ap.add_argument("--budget-gib", type=float, help="summed RSS budget (default: MemAvailable - margin)")
    ap.add_argument("--margin-gib", type=float, default=1.5, help="kept free below MemAvailable at start")
    ap.add_argument("--resolution", type=float, default=0.02, help="stop when the gap is below this fraction")
    ap.add_argument("--resolution-classes", type=int, default=100_000, help="... or below this many classes")
    ap.add_argument("--steps", type=int, default=3, help="FC_STEPS of each trial (after 2 warm-up steps)")
    ap.add_argument("--rate", type=float, default=0.1, help="PartialFC sample rate")
    ap.add_argument("--batch", type=int, default=256, help="global batch")
    ap.add_argument("--lo", type=int, default=0, help="a class count known to run (search start)")
    ap.add_argument("--hi", type=int, help="a class count known not to fit (default: the bytes bound)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per trial before it is killed")
    ap.add_argument("--interval", type=float, default=0.2,
                    help="seconds between RSS samples (a launch can grow ~0.5 GiB in 0.2 s: keep the margin)")
    ap.add_argument("--min-available-gib", type=float, default=0.5,
                    help="kill the trial and stop if the machine's MemAvailable drops below this")
    ap.add_argument("--fc-chunks", default=os.environ.get("FC_CHUNKS", "1"),
                    help="FC_CHUNKS of every trial: an integer K or auto (default: $FC_CHUNKS, else 1)")
    ap.add_argument("--fc-memory-gib", type=float, default=float(os.environ.get("FC_MEMORY_GIB", 0) or 0),
                    help="FC_MEMORY_GIB of every trial, auto's per-rank budget (default: $FC_MEMORY_GIB; with "
                         "auto and none, (budget - launcher) / ranks less 3 %%)")
    args = ap.parse_args(argv)
    info = meminfo()
    safe = info["MemAvailable"] - int(args.margin_gib * GIB)
    budget = int(args.budget_gib * GIB) if args.budget_gib else safe
    per_rank = args.fc_memory_gib
    if args.fc_chunks == "auto" and not per_rank:
        per_rank = round((budget / GIB - LAUNCHER_GIB) / WORLD * (1 - PREDICTION_MARGIN), 2)
    print(f"machine: {os.cpu_count()} cores, MemTotal {info['MemTotal'] / GIB:.2f} GiB, MemAvailable "
          f"{info['MemAvailable'] / GIB:.2f} GiB; budget {budget / GIB:.2f} GiB summed RSS; FC_CHUNKS "
          f"{args.fc_chunks}, FC_MEMORY_GIB {per_rank or 'default'}; load average "
          "%.2f %.2f %.2f at start" % os.getloadavg(), flush=True)
    if budget > safe:
        print(f"warning: budget above MemAvailable - {args.margin_gib} GiB: the kernel may kill first", flush=True)
    rows, failed = [], False
    for dim in args.dims:
        hi = args.hi or bytes_bound(budget, dim)
        print(f"dim {dim}: bisecting ({args.lo:,}, {hi:,}) classes", flush=True)
        s = search(lambda c, d=dim: run_trial(c, d, budget, rate=args.rate, batch=args.batch, steps=args.steps,
                                              timeout=args.timeout, interval=args.interval,
                                              min_available=int(args.min_available_gib * GIB),
                                              fc_chunks=args.fc_chunks, fc_memory_gib=per_rank),
                   args.lo, hi, resolution=args.resolution, resolution_classes=args.resolution_classes,
                   report=lambda t, d=dim: print(describe(d, t), flush=True))
        failed |= s.stopped is not None
        rows.append(table_row(dim, s, budget, datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")))
    print(f"\nr {args.rate}, sparse update, {WORLD} ranks, global batch {args.batch}, {args.steps} timed steps "
          f"(+2 warm-up), FC_CHUNKS {args.fc_chunks}, FC_MEMORY_GIB {per_rank or 'default'}; "
          f"machine {os.cpu_count()} cores, MemTotal {info['MemTotal'] / GIB:.2f} GiB")
    print("| dim | largest that ran | smallest that did not | peak RSS/rank at largest | budget | load average "
          "| date |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
