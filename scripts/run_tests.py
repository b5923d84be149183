"""Run every tests/test_*.py in its own pytest process, then print one summary (what `make test` does).

Why not one pytest process: OneFlow 0.9.0 keeps per-process runtime state for every nn.Graph it
compiles, and a single process that had compiled the graphs of the whole suite crashed natively
(SIGSEGV inside ``tensor.numpy()``, cf. OneFlow issue #9178) at a random test, one run in two. One
process per file keeps that state small. A file whose process is killed by a signal is run once more
and the crash is reported in the summary; a second crash fails the run. A rank that crashes inside a
test is run once more by tests/conftest.py's `launch`, which records it in the file named by
$OF_FACE_CRASH_LOG; both kinds are named in the closing line, so an intermittent crash is seen:
`==== 365 passed in 54 files, 1190 s; 1 native crash rerun: test_x.py ====`. Test failures are
never rerun.

--fast deselects the tests marked `slow` (`-m "not slow"`): `make test` runs that subset, `make
test-all` everything (see README, "Tests").

Usage: python scripts/run_tests.py [--fast] [test files...] [-- extra pytest args]
"""
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SLOWEST = 12


def run_file(path, report, extra, crash_log):
    cmd = [sys.executable, "-m", "pytest", str(path), "-q", "-p", "no:cacheprovider",
           f"--junitxml={report}", *extra]
    return subprocess.run(cmd, cwd=REPO, env={**os.environ, "OF_FACE_CRASH_LOG": str(crash_log)}).returncode


def read_report(report):
    """[(test id, seconds, outcome)] from a junit XML file written by pytest."""
    if not report.exists():
        return []
    cases = []
    for case in ET.parse(report).getroot().iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            if case.find(tag) is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
        cases.append((f"{case.get('classname')}::{case.get('name')}", float(case.get("time", 0)), outcome))
    return cases


def crash_summary(crashes):
    """'; 2 native crashes rerun: test_a.py, test_b.py (a rank)' or '' when nothing crashed."""
    if not crashes:
        return ""
    return f"; {len(crashes)} native crash{'es' if len(crashes) > 1 else ''} rerun: {', '.join(crashes)}"


def main(argv):
    ours, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    fast = "--fast" in ours
    extra = ["-m", "not slow", *extra] if fast else extra
    files = [Path(a) for a in ours if a != "--fast"]
    files = files or sorted((REPO / "tests").glob("test_*.py"))
    start, cases, broken, crashes = time.time(), [], [], []
    with tempfile.TemporaryDirectory(prefix="of_face_tests_") as tmp:
        crash_log = Path(tmp) / "rank_crashes.txt"
        for path in files:
            report = Path(tmp) / f"{path.stem}.xml"
            code = run_file(path, report, extra, crash_log)
            if code < 0:  # killed by a signal: a native crash, not a test verdict
                crashes.append(f"{path.name} (signal {-code})")
                code = run_file(path, report, extra, crash_log)
            cases += read_report(report)
            if code not in (0, 5):  # 5: nothing collected (e.g. deselected by -k or --fast)
                broken.append(f"{path.name} (exit {code})")
        # one line per rank crash that conftest.launch ran once more: "<test file>: <what crashed>"
        rank_crashes = crash_log.read_text().splitlines() if crash_log.exists() else []
    counts = {k: sum(1 for c in cases if c[2] == k) for k in ("passed", "failed", "error", "skipped")}
    print(f"\n==== slowest {SLOWEST} tests ====")
    for name, seconds, _ in sorted(cases, key=lambda c: -c[1])[:SLOWEST]:
        print(f"{seconds:8.2f}s  {name}")
    for name, _, outcome in cases:
        if outcome in ("failed", "error"):
            print(f"{outcome.upper()}: {name}")
    for crash in crashes:
        print(f"NATIVE CRASH, file rerun once: {crash}")
    for crash in rank_crashes:
        print(f"NATIVE CRASH of a rank, launch rerun once: {crash}")
    summary = ", ".join(f"{n} {k}{'s' if k == 'error' and n > 1 else ''}" for k, n in counts.items() if n)
    crashed = crash_summary([c.split(" ")[0] for c in crashes] + [f"{c.split(':')[0]} (a rank)" for c in rank_crashes])
    subset = " (--fast: slow tests deselected)" if fast else ""
    if broken:
        print("files that did not pass: " + ", ".join(broken))
    # the closing line, always last, read by CI like pytest's: "==== 365 passed, 2 failed in ... ===="
    print(f"==== {summary or 'no tests'} in {len(files)} files, {time.time() - start:.0f} s{subset}{crashed} ====")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
