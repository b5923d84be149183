"""Run every tests/test_*.py in its own pytest process, then print one summary (what `make test` does).

Why not one pytest process: OneFlow 0.9.0 keeps per-process runtime state for every nn.Graph it
compiles, and a single process that had compiled the graphs of the whole suite crashed natively
(SIGSEGV inside ``tensor.numpy()``, cf. OneFlow issue #9178) at a random test, one run in two. One
process per file keeps that state small. A file whose process is killed by a signal is run once more
and the crash is reported in the summary; a second crash fails the run. Test failures are never rerun.

Usage: python scripts/run_tests.py [test files...] [-- extra pytest args]
"""
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SLOWEST = 12


def run_file(path, report, extra):
    cmd = [sys.executable, "-m", "pytest", str(path), "-q", "-p", "no:cacheprovider",
           f"--junitxml={report}", *extra]
    return subprocess.run(cmd, cwd=REPO).returncode


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


def main(argv):
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    files = [Path(a) for a in (argv[:argv.index("--")] if "--" in argv else argv)]
    files = files or sorted((REPO / "tests").glob("test_*.py"))
    start, cases, broken, crashes = time.time(), [], [], []
    with tempfile.TemporaryDirectory(prefix="of_face_tests_") as tmp:
        for path in files:
            report = Path(tmp) / f"{path.stem}.xml"
            code = run_file(path, report, extra)
            if code < 0:  # killed by a signal: a native crash, not a test verdict
                crashes.append(f"{path.name} (signal {-code})")
                code = run_file(path, report, extra)
            cases += read_report(report)
            if code not in (0, 5):  # 5: nothing collected (e.g. deselected by -k)
                broken.append(f"{path.name} (exit {code})")
    counts = {k: sum(1 for c in cases if c[2] == k) for k in ("passed", "failed", "error", "skipped")}
    print(f"\n==== slowest {SLOWEST} tests ====")
    for name, seconds, _ in sorted(cases, key=lambda c: -c[1])[:SLOWEST]:
        print(f"{seconds:8.2f}s  {name}")
    for name, _, outcome in cases:
        if outcome in ("failed", "error"):
            print(f"{outcome.upper()}: {name}")
    for crash in crashes:
        print(f"NATIVE CRASH, file rerun once: {crash}")
    summary = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
    print(f"==== {summary or 'no tests'} in {len(files)} files, {time.time() - start:.0f} s ====")
    if broken:
        print("files that did not pass: " + ", ".join(broken))
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
