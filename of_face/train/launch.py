"""Start the training ranks of this node, watch them, and end the whole run when one fails.

    python -m of_face.train.launch [--nnodes N --node-rank R --nproc-per-node P --master ADDR:PORT]
                                   -c CONFIG [-o Section.key=value ...]

(`scripts/train_ddp.sh` calls it.) Why not `oneflow.distributed.launch` directly: when one rank
raises, the others block in a collective forever or die natively, every rank prints the error, the
launcher adds a `CalledProcessError` traceback and the shell gets exit code 1. Here:

  * the config is read and checked once, before any process starts (`error: ...`, exit 2);
  * each rank runs in its own process group (its loader workers with it) with the environment
    OneFlow's launcher would set (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) plus
    OF_FACE_LAUNCHER_PID, so that the rank dies with the launcher (`guard_rank`);
  * a failing rank writes its exit code and one `error: ...` line to stderr and waits
    (train/errors.fail); on that line, or on any rank exiting non-zero, every rank's group is
    killed at once, before a peer notices the lost connection and aborts natively;
  * the failing rank's error line is printed once (an other rank's line only if it says something
    else), and the launcher exits with the rank's code (2 bad config/input, 1 runtime failure,
    3 diverged). A rank killed by a signal becomes one line naming the signal, exit 1.

Several nodes: each node's launcher ends its own ranks only. The other nodes' ranks lose a peer:
OneFlow aborts them natively (their launchers report the signal) or leaves them waiting, as with
OneFlow's own launcher (not tested here: one machine).
"""
import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from typing import Deque, List, Optional, Tuple

from of_face._libs import process_env
from of_face.train.errors import CODE_PREFIX, ERROR_PREFIX  # what a failing rank writes (errors.fail)

# printed by every OneFlow import on a machine without InfiniBand: not news, once per rank
NOISE = ("libibverbs not available",)
# A rank's stderr line is held this long before it is forwarded. When a rank dies (kill -9, a
# native crash), its peers notice the lost connection within milliseconds and OneFlow aborts them
# natively with a C++ `Check failure stack trace`; the launcher learns of the death about as fast
# (a thread waits on each rank), and drops what is still held: the user sees the one line.
HOLD_S = 0.5


class _Rank:
    """One rank's process and the error lines it wrote to stderr."""

    def __init__(self, rank: int, cmd: List[str], env: dict, run: "_Run"):
        self.rank, self.run = rank, run
        self.proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, start_new_session=True)
        self.errors: List[Tuple[float, str]] = []  # (arrival time, line)
        self.code: Optional[int] = None  # the exit code the rank announced with its error line
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        # waitpid in a thread: a death is seen at once, not at the next poll
        self.waiter = threading.Thread(target=self._wait, daemon=True)
        self.waiter.start()

    def _read(self):
        for raw in iter(self.proc.stderr.readline, b""):
            line = raw.decode("utf-8", "replace")
            if line.startswith(CODE_PREFIX):
                self.code = int(line[len(CODE_PREFIX):])
            elif line.startswith(ERROR_PREFIX):
                self.errors.append((time.monotonic(), line.rstrip("\n")))
                self.run.failed(self)
            elif not line.startswith(NOISE):
                self.run.output(self, line)

    def _wait(self):
        if self.proc.wait() != 0:
            self.run.failed(self, exited=True)

    def kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the rank and its loader workers
        except (ProcessLookupError, PermissionError):
            pass


class _Run:
    """The ranks of this node; the first to fail ends them all at once. A failing rank announces
    its exit code and error line, then waits: every rank is killed before any notices a lost peer
    and adds native-abort noise of its own. The ranks' other stderr lines pass through a short
    hold (HOLD_S); on a failure the other ranks' held lines are dropped, the failing rank's
    (a traceback that says why it exited) still forwarded."""

    def __init__(self, hold: float = HOLD_S):
        self.ranks: List[_Rank] = []
        self.first: Optional[_Rank] = None
        self.spared: Optional[_Rank] = None  # the rank whose output still counts after a failure
        self.lock = threading.Lock()
        self.hold = hold
        self.held: Deque[Tuple[float, _Rank, str]] = deque()
        self.flusher = threading.Thread(target=self._flush_loop, daemon=True)
        self.flusher.start()

    def output(self, rank: _Rank, line: str) -> None:
        with self.lock:
            if self.first is None or rank is self.spared:
                self.held.append((time.monotonic(), rank, line))

    def flush(self, older_than: Optional[float] = None) -> None:
        """Forward the held lines (all, or those that arrived before `older_than`)."""
        with self.lock:
            while self.held and (older_than is None or self.held[0][0] <= older_than):
                _, rank, line = self.held.popleft()
                if self.first is None or rank is self.spared:
                    sys.stderr.write(line)
            sys.stderr.flush()

    def _flush_loop(self):
        while True:
            time.sleep(0.05)
            self.flush(time.monotonic() - self.hold)

    def failed(self, rank: _Rank, exited: bool = False) -> None:
        """`rank` reported an error line (it waits to be killed too, see CODE_PREFIX), or `exited`
        non-zero without one (a traceback, or a signal). What it wrote is still forwarded; what
        the others wrote in the last HOLD_S and from now on is dropped: their reaction to it."""
        with self.lock:
            if self.first is not None:
                return
            self.first, self.spared = rank, rank
            self.held = deque(item for item in self.held if item[1] is rank)
        self.stop()

    def stop(self) -> None:
        for r in self.ranks:
            r.kill()


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def watch(run: _Run, poll: float = 0.05) -> int:
    """Wait for every rank; on the first failure (an error line, or a non-zero exit) kill the rest
    and report it. Returns the exit code for the shell."""
    ranks = run.ranks
    while True:
        exited = next((r for r in ranks if r.proc.poll() not in (None, 0)), None)
        if exited is not None:
            run.failed(exited, exited=True)  # no-op if a rank already reported an error line
        if run.first is not None:
            break
        if all(r.proc.poll() == 0 for r in ranks):
            for r in ranks:
                r.reader.join(timeout=5)
            run.flush()
            return 0
        time.sleep(poll)
    failed = run.first
    for r in ranks:
        r.reader.join(timeout=5)
        r.proc.wait()
    run.flush()  # the failing rank's own last words (a traceback), if it exited by itself
    code = failed.code if failed.code is not None else failed.proc.returncode
    lines = list(dict.fromkeys(line for _, line in failed.errors))
    # another rank's line counts if it came no later than the failing rank's own: later ones are
    # consequences of that rank's failure (a peer lost inside a collective); a rank that died
    # without a line was the first to fail, so any other rank's line is a consequence
    until = failed.errors[0][0] if failed.errors else float("-inf")
    if not lines:
        if code < 0:
            lines = [f"{ERROR_PREFIX}rank {failed.rank} was killed by {_signal_name(code)} (a native crash "
                     "inside OneFlow, or the system's out-of-memory killer); run it again, and report it "
                     "if it repeats"]
        else:
            lines = [f"{ERROR_PREFIX}rank {failed.rank} exited with code {code}; its output is above"]
    for r in ranks:  # what another rank found independently, if it differs
        for t, line in r.errors:
            if t <= until and line not in lines:
                lines.append(line)
    for line in lines:
        print(line, file=sys.stderr, flush=True)
    return code if code > 0 else 1


def _parse(argv: Optional[List[str]]):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--nproc-per-node", type=int, default=2)
    p.add_argument("--master", default="127.0.0.1:12538", help="ADDR:PORT of node 0")
    p.add_argument("--module", default="of_face.train.main", help="what each rank runs (python -m)")
    return p.parse_known_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args, rest = _parse(argv)
    from of_face.config import ConfigError, load_config
    from of_face.train.main import parse_args

    try:  # once, here: a bad config never starts a process
        train_args = parse_args(rest)
        cfg = load_config(train_args.config, train_args.override)
    except ConfigError as e:
        print(f"{ERROR_PREFIX}{e}", file=sys.stderr)
        return 2
    addr, _, port = args.master.rpartition(":")
    world = args.nnodes * args.nproc_per_node
    env = dict(os.environ, MASTER_ADDR=addr or "127.0.0.1", MASTER_PORT=port, WORLD_SIZE=str(world),
               OF_FACE_LAUNCHER_PID=str(os.getpid()), PYTHONUNBUFFERED="1")
    env.update(process_env(cfg.Global.device))
    if args.nproc_per_node > 1:
        env.setdefault("OMP_NUM_THREADS", "1")  # as OneFlow's launcher: P ranks share the cores
    run = _Run()

    def stop(signum, frame):
        run.stop()
        os._exit(128 + signum)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    for local in range(args.nproc_per_node):
        rank = args.node_rank * args.nproc_per_node + local
        run.ranks.append(_Rank(rank, [sys.executable, "-u", "-m", args.module, *rest],
                               dict(env, RANK=str(rank), LOCAL_RANK=str(local)), run))
    return watch(run)


if __name__ == "__main__":
    sys.exit(main())
