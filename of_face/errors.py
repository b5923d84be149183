"""How an `of-face` tool ends on a failure: one `error: ...` line on stderr and an exit code.

Exit codes, as for training (train/errors.py): 2 an argument or an input file is refused (missing,
unreadable, of the wrong kind or shape), 1 a runtime failure (no permission, disk full, a failed
conversion or check, an internal error). The message names the file / flag / value and what was
expected; `OF_FACE_DEBUG=1` adds the Python traceback. Every command goes through `run_command`
(`of-face <command>` in cli.py, and each command's own `main` through `one_line_errors`), so no
tool ends in a traceback.
"""
import functools
import os
import sys
import traceback
from typing import Callable, Tuple

INPUT, RUNTIME = 2, 1


class ToolError(Exception):
    """A failure already phrased for the user: `code` 2 (input refused) or 1 (runtime)."""

    code = INPUT

    def __init__(self, message: str, code: int = 0):
        super().__init__(message)
        if code:
            self.code = code


def describe(exc: BaseException) -> Tuple[int, str]:
    """(exit code, message without the `error: ` prefix) for an exception that ends a command."""
    if isinstance(exc, ToolError):
        return exc.code, str(exc)
    if isinstance(exc, OSError):
        text = f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc)
        refused = isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError))
        return (INPUT if refused else RUNTIME), text
    if isinstance(exc, ValueError):  # the readers name the file / key / value in their ValueErrors
        return INPUT, str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return 130, "interrupted"
    return RUNTIME, f"{type(exc).__name__}: {exc} (an internal error; OF_FACE_DEBUG=1 prints the traceback)"


def run_command(main: Callable[..., int], *args, **kwargs) -> int:
    """Call a command's main; a failure becomes one `error:` line and the exit code, returned."""
    try:
        return main(*args, **kwargs) or 0
    except SystemExit:  # argparse's usage errors (exit 2) and explicit exits pass through
        raise
    except BaseException as e:  # noqa: BLE001 - every failure, the internal ones included, is one line
        code, message = describe(e)
        if os.environ.get("OF_FACE_DEBUG") == "1":
            traceback.print_exception(type(e), e, e.__traceback__)
        sys.stdout.flush()
        print(f"error: {message}", file=sys.stderr, flush=True)
        return code


def one_line_errors(main: Callable[..., int]) -> Callable[..., int]:
    """Decorate a command's main with `run_command`."""
    @functools.wraps(main)
    def run(*args, **kwargs):
        return run_command(main, *args, **kwargs)
    return run
