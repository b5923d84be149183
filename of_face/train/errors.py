"""How a training process ends on an error: one `error: ...` line, an exit code, no hang.

Exit codes: 2 the config or an input (data, checkpoint, verification set) is refused, 1 a runtime
failure (disk full, an internal error, a native crash seen by the launcher), 3 training diverged.

A rank that fails must not wait for the others: they may be blocked in a collective that this
rank will never join, and Python's normal exit runs OneFlow's shutdown, which waits for them too
(the hangs and native aborts seen on two ranks). So with more than one rank the process leaves
with os._exit right after its line; the launcher (of_face.train.launch) kills the other ranks and
prints the line once. OF_FACE_DEBUG=1 adds the Python traceback.
"""
import errno
import os
import sys
import time
import traceback
from typing import Tuple


class InputError(ValueError):
    """An input (data record, verification set, index) is unusable: exit code 2."""


def describe(exc: BaseException, output_dir: str = "") -> Tuple[int, str]:
    """(exit code, message without the `error: ` prefix) for an exception that ends training."""
    from of_face.config import ConfigError

    name = type(exc).__name__
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
    code, message = describe(exc, output_dir)
    if os.environ.get("OF_FACE_DEBUG") == "1":
        traceback.print_exception(type(exc), exc, exc.__traceback__)
    sys.stdout.flush()
    launched = bool(os.environ.get("OF_FACE_LAUNCHER_PID"))
    if launched:  # of_face.train.launch reads the code, then kills every rank at once
        print(f"of_face-exit-code: {code}", file=sys.stderr, flush=True)
    print(f"error: {message}", file=sys.stderr, flush=True)
    if world_size > 1:
        if launched:
            time.sleep(30)  # killed long before: exiting now would make the peers abort natively
        os._exit(code)
    sys.exit(code)
