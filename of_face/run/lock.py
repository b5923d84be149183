"""Process lifetime and the run folder's lock.

- A lock file `.of_face.lock` (JSON: pid, host, start time, run id) is taken by rank 0 at start
  and removed when the process exits. Another live run's lock refuses the start with one message;
  a lock left by a dead process on this host (kill -9, OOM) is taken over (one still exiting is
  waited for up to LOCK_WAIT_S); a lock of another host cannot be checked and is refused, naming
  the file to delete if that run is known to be gone.
- Ranks die with their launcher: `die_with_parent()` (Linux prctl PR_SET_PDEATHSIG).
"""
import atexit
import json
import os
import signal
import socket
import time
from typing import Callable, Optional

from of_face.config import ConfigError
from of_face.run.names import LOCK_FILE


class RunFolderError(ConfigError):
    """The run folder cannot be used for this run (held by another run, holds another run's work)."""


LOCK_WAIT_S = 10.0  # a holder on this host that is exiting (its launcher just killed it) gets this long


def pid_alive(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, someone else's
        return True
    try:  # a zombie (exited, not yet reaped) is not a run
        with open(f"/proc/{int(pid)}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _outlives(pid: int, seconds: float) -> bool:
    """Whether process `pid` is still alive after up to `seconds` of waiting for it to end."""
    deadline = time.time() + seconds
    while pid_alive(pid):
        if time.time() >= deadline:
            return True
        time.sleep(0.2)
    return False


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Linux: this process gets `sig` when its parent (the launcher) dies, so killing only the
    launcher never leaves ranks training and writing on their own. No-op elsewhere."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the launcher died before prctl took effect
        os._exit(1)


# --------------------------------------------------------------------------- lock


def read_lock(out_dir: str) -> Optional[dict]:
    try:
        with open(os.path.join(out_dir, LOCK_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _release(path: str, pid: int) -> None:
    try:
        with open(path) as f:
            if json.load(f).get("pid") == pid:
                os.remove(path)
    except (OSError, ValueError):
        pass


def take_lock(out_dir: str, run_id: str, log: Optional[Callable[[str], None]] = None) -> Optional[dict]:
    """Lock out_dir for this process (removed at exit). Returns the lock this same process already
    held there (a second Trainer in one process is the same run), else None. RunFolderError when
    another live run holds it."""
    path = os.path.join(out_dir, LOCK_FILE)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "run_id": run_id,
          "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    tmp = f"{path}.new{os.getpid()}"
    for _ in range(3):
        with open(tmp, "w") as f:
            json.dump(me, f)
        try:
            os.link(tmp, path)  # complete content or no lock at all; fails if a lock exists
            atexit.register(_release, path, os.getpid())
            return None
        except FileExistsError:
            pass
        finally:
            os.remove(tmp)
        held = read_lock(out_dir) or {}
        pid, host = held.get("pid"), held.get("host")
        if pid == os.getpid() and host == me["host"]:
            return held
        if host == me["host"] and isinstance(pid, int) and not _outlives(pid, LOCK_WAIT_S):
            if log:
                log(f"{out_dir}: taking over the lock of a run that is gone (pid {pid}, started {held.get('started')})")
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            continue
        raise RunFolderError(
            f"Global.output_dir: {out_dir} is in use by another run (pid {pid} on host {host}, started "
            f"{held.get('started')}; lock file {path}). Wait for it, pick another output_dir, or delete the "
            "lock file if that run is gone")
    raise RunFolderError(f"Global.output_dir: could not take the lock {path} (it keeps changing)")
