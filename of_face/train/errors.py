"""How a training process ends on an error: one `error: ...` line, an exit code, no hang.

Exit codes: 2 the config or an input (data, checkpoint, verification set) is refused, 1 a runtime
failure (disk full, an internal error, a native crash seen by the launcher), 3 training diverged.

A rank that fails must not wait for the others: they may be blocked in a collective that this
rank will never join, and Python's normal exit runs OneFlow's shutdown, which waits for them too
(the hangs and native aborts seen on two ranks). So with more than one rank the process never
returns: under the launcher (of_face.train.launch) it announces its exit code and line and waits
to be killed with all the others (the launcher prints the line once and exits with that code);
otherwise it leaves with os._exit. OF_FACE_DEBUG=1 adds the Python traceback.
"""
import ctypes
import errno
import os
import signal
import sys
import threading
import time
import traceback
from typing import Tuple

ERROR_PREFIX = "error: "
# under of_face.train.launch a failing rank writes `CODE_PREFIX<exit code>` just before its error
# line, then waits to be killed: its own exit could make a peer abort natively before the launcher
# kills it, and that noise would bury the line
CODE_PREFIX = "of_face-exit-code: "
PR_SET_PDEATHSIG = 1


def guard_rank() -> None:
    """In a rank started by a launcher (of_face.train.launch, or any when WORLD_SIZE > 1): die
    (SIGKILL) when the launcher dies, so that a dead launcher never leaves ranks waiting in a
    collective. Linux prctl, else a watchdog thread."""
    pid = os.environ.get("OF_FACE_LAUNCHER_PID")
    if not pid and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # under another launcher (oneflow.distributed.launch): it gives up on a failed rank without
        # killing the others, which then wait in a collective (and hold its pipes) forever
        pid = str(os.getppid())
    if not pid:
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (AttributeError, OSError):
        def watchdog():
            while os.getppid() == int(pid):
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watchdog, daemon=True).start()
    if os.getppid() != int(pid):  # the launcher died before prctl took effect
        os._exit(1)


class PeerFailed(RuntimeError):
    """Another rank (rank 0) already reported why the run stops: this rank says nothing and waits
    to be killed, so the launcher prints that rank's line, not a vaguer one from here."""


class InputError(ValueError):
    """An input (data record, verification set, index) is unusable: exit code 2."""


def describe(exc: BaseException, output_dir: str = "") -> Tuple[int, str]:
    """(exit code, message without the `error: ` prefix) for an exception that ends training."""
    from of_face.config import ConfigError

    name = type(exc).__name__
    if isinstance(exc, OSError) and isinstance(exc, ConfigError):  # a checkpoint write that failed on some
        return 1, str(exc)  # rank (checkpoint.CheckpointWriteError): a runtime failure, already one line
    if isinstance(exc, (ConfigError, InputError)):
        return 2, str(exc)
    if name == "NonFiniteLoss":
        return 3, str(exc)
    if isinstance(exc, OSError):
        where = exc.filename or output_dir or "?"
        if exc.errno == errno.ENOSPC:
            return 1, (f"{where}: no space left on device; free some space (or set Global.output_dir to another "
                       "disk) and resume with Global.resume=auto: the last complete checkpoint is kept")
        if isinstance(exc, FileNotFoundError):
            return 2, (f"{where}: file not found" if exc.filename else str(exc))
        if exc.errno is not None and exc.strerror:
            return 1, f"{where}: {exc.strerror}"
        return 1, f"{name}: {exc}"
    if isinstance(exc, ValueError):  # the data layer names the file/record in its ValueErrors
        return 2, str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return 130, "interrupted"
    return 1, f"{name}: {exc} (an internal error; OF_FACE_DEBUG=1 prints the traceback)"


def fail(exc: BaseException, world_size: int, output_dir: str = "") -> None:
    """Print the one line for `exc` and end this process with its code (see the module docstring)."""
    if isinstance(exc, PeerFailed) and world_size > 1:
        time.sleep(30)  # rank 0's line and code end the run (the launcher kills this rank first)
        os._exit(2)
    code, message = describe(exc, output_dir)
    if os.environ.get("OF_FACE_DEBUG") == "1":
        traceback.print_exception(type(exc), exc, exc.__traceback__)
    sys.stdout.flush()
    launched = bool(os.environ.get("OF_FACE_LAUNCHER_PID"))
    if launched:  # of_face.train.launch reads the code, then kills every rank at once
        print(f"{CODE_PREFIX}{code}", file=sys.stderr, flush=True)
    print(f"{ERROR_PREFIX}{message}", file=sys.stderr, flush=True)
    if world_size > 1:
        if launched:
            time.sleep(30)  # killed long before: exiting now would make the peers abort natively
        os._exit(code)
    sys.exit(code)
