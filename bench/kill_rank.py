"""kill -9 one rank of a 2-rank training run at a random step, N times: does the user see only the
launcher's one line, or also the surviving rank's native noise (OneFlow's C++ `Check failure
stack trace`, a Python traceback)?

    python bench/kill_rank.py [--reps 10] [--rank 1] [--mode graph] [--seed 0]

Each repetition trains a tiny IResNet on a small synthetic RecordIO set through
`python -m of_face.train.launch` (what scripts/train_ddp.sh runs), waits for rank 0's progress
line of a random step, SIGKILLs the chosen rank and reads everything the launcher printed. A
repetition is clean when the launcher's stderr holds exactly the one `error: rank R was killed
by SIGKILL` line (and OneFlow's `libibverbs not available` import line, printed before any rank
starts) and the exit code is 1.
Prints one line per repetition and `clean: K of N`; exit status 1 unless all are clean.
"""
import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def rank_pid(launcher_pid: int, rank: int, timeout: float = 120.0) -> int:
    """The pid of the launcher's child whose environment says RANK=<rank>."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
        except OSError:
            children = []
        for pid in map(int, children):
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return pid
        time.sleep(0.1)
    raise RuntimeError(f"rank {rank} of launcher {launcher_pid} not found")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def make_data(root: Path) -> Path:
    from of_face.data import synthetic

    synthetic.generate(root, num_identities=12, images_per_identity=4, val_identities=2, val_pairs=2)
    return root


def overrides(data: Path, out: Path, mode: str, steps: int):
    return ["Model.name=iresnet", "Model.layers=[1,1,1,1]", "Model.width=8", "Model.embedding_size=32",
            "Data.dataset=rec", f"Data.root={data}", "Data.val_targets=[]", "Data.batch_size=4",
            "Global.device=cpu", "Global.eval_before_training=false", f"Global.output_dir={out}",
            f"Global.max_steps={steps}", "Global.epochs=1000", "Global.log_interval=1", f"Global.mode={mode}"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_once(data: Path, out: Path, step: int, rank: int = 1, mode: str = "graph", steps: int = 100,
             timeout: float = 300.0, launcher: str = "of_face.train.launch"):
    """Train, SIGKILL `rank` when rank 0 prints step `step`; returns (exit code, stderr, stdout)."""
    cmd = [sys.executable, "-m", launcher, "--nproc-per-node", "2",
           "--master", f"127.0.0.1:{free_port()}", "-c", str(REPO / "configs" / "default.yaml")]
    for o in overrides(data, out, mode, steps):
        cmd += ["-o", o]
    return kill_during(cmd, step, rank, timeout)


def kill_during(cmd, step: int, rank: int = 1, timeout: float = 300.0):
    """Run the launcher command `cmd` (from the repository), SIGKILL `rank` when rank 0 prints step
    `step`; returns (exit code, stderr, stdout). The tests pass their own tiny run's command."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True)
        victim = rank_pid(proc.pid, rank)
        seen, t0 = [], time.time()
        for line in proc.stdout:
            seen.append(line)
            if line.startswith(f"step {step}/"):
                if not alive(victim):  # the run got ahead of this reader: not a kill at all
                    raise RuntimeError(f"rank {rank} (pid {victim}) was gone before step {step} was read")
                os.kill(victim, signal.SIGKILL)
                break
            if time.time() - t0 > timeout:
                break
        else:
            proc.kill()
            raise RuntimeError(f"the run ended before rank 0 printed step {step}")
        rest = proc.stdout.read()
        proc.wait(timeout=timeout)
        err.seek(0)
        return proc.returncode, err.read().decode("utf-8", "replace"), "".join(seen) + rest


def clean(code: int, stderr: str, rank: int = 1):
    """(is clean, the lines that should not be there)."""
    expected = f"error: rank {rank} was killed by SIGKILL"
    # OneFlow's import line in the launcher itself, before any rank starts: not a consequence of the kill
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("libibverbs not available")]
    extra = [ln for ln in lines if not ln.startswith(expected)]
    ok = code == 1 and sum(ln.startswith(expected) for ln in lines) == 1 and not extra
    return ok, extra


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--rank", type=int, default=1)
    ap.add_argument("--mode", default="graph", choices=["graph", "eager"])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--launcher", default="of_face.train.launch",
                    help="the launcher module (another version of it, to compare)")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    good = 0
    with tempfile.TemporaryDirectory(prefix="of_face_kill_") as tmp:
        data = make_data(Path(tmp) / "faces")
        for i in range(args.reps):
            step = rng.randint(2, 25)
            t0 = time.time()
            code, stderr, _ = run_once(data, Path(tmp) / f"run{i}", step, args.rank, args.mode, args.steps,
                                           launcher=args.launcher)
            ok, extra = clean(code, stderr, args.rank)
            good += ok
            note = "clean" if ok else f"NOISE ({len(extra)} extra lines, e.g. {extra[:2]})"
            print(f"rep {i + 1}: kill -9 rank {args.rank} at step {step}: exit {code}, {time.time() - t0:.0f} s, "
                  f"{note}", flush=True)
    print(f"clean: {good} of {args.reps}")
    return 0 if good == args.reps else 1


if __name__ == "__main__":
    sys.exit(main())
