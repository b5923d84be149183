"""A stand-in rank for tests of of_face.train.launch (run as `-m tests.workers.launch_probe`).

Writes its pid to $PROBE_DIR/rank<R>.pid, then acts on $PROBE_MODE:
  segv1   rank 1 kills itself with SIGSEGV (a native crash), rank 0 sleeps
  sleep   every rank sleeps (the launcher is killed by the test)
"""
import os
import signal
import time

from of_face.train.errors import guard_rank

guard_rank()
rank = int(os.environ["RANK"])
with open(os.path.join(os.environ["PROBE_DIR"], f"rank{rank}.pid"), "w") as f:
    f.write(str(os.getpid()))
if os.environ["PROBE_MODE"] == "segv1" and rank == 1:
    time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGSEGV)
time.sleep(120)
