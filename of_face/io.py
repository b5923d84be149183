"""Atomic file writes: one temporary-name scheme, and the clean-up that matches it.

Every writer of of_face that must never leave half a file behind (checkpoints, backbone.npz,
config.yaml, metrics.csv rewrites, plots, ONNX exports, converter outputs, evaluation results)
writes `<folder>/.<name>.tmp<pid>` next to its target, flushes and fsyncs it, then renames it over
the target (`os.replace`, atomic on POSIX). On any error, including KeyboardInterrupt, the
temporary file is removed and the target is left as it was. A process killed mid-write (kill -9,
OOM) leaves its temporary behind; `remove_stale_temporaries` deletes exactly those names.

    with atomic_write(path) as f:          # binary; atomic_write(path, "w", newline="") for text
        np.savez(f, **arrays)

`atomic_path` is the same for writers that want a file name rather than a file object (e.g.
mxnet's RecordIO writer opens its own files).
"""
import contextlib
import errno
import os
import re
import shutil
import tempfile
from typing import IO, Callable, Iterator, List, Tuple, Union

from of_face.errors import RUNTIME, ToolError

PathLike = Union[str, "os.PathLike[str]"]
# `.<name>.tmp<pid>`: a hidden name that still says which file it will become
TEMP_RE = re.compile(r"^\..+\.tmp(\d+)$")


def temp_name(path: PathLike) -> str:
    """The temporary name of `path` for this process: `<folder>/.<name>.tmp<pid>`."""
    path = os.fspath(path)
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.tmp{os.getpid()}")


def _discard(tmp: str) -> None:
    if os.path.isdir(tmp) and not os.path.islink(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
    elif os.path.lexists(tmp):
        os.remove(tmp)


def fsync_path(path: str) -> None:
    """fsync a file or a folder (a folder: so that a rename or a new entry in it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _injected_fault(path: PathLike) -> None:
    """Test hook: OF_FACE_FAULT_ENOSPC=<text> makes every atomic write whose file name contains
    <text> fail as a full disk would (after the data went to the temporary file, before the
    rename), so tests can run a real launcher into "disk full" without filling a disk."""
    text = os.environ.get("OF_FACE_FAULT_ENOSPC")
    if text and text in os.path.basename(os.fspath(path)):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))


@contextlib.contextmanager
def atomic_path(path: PathLike, sync: bool = True) -> Iterator[str]:
    """Yield the temporary name of `path`; on success fsync that file (unless `sync` is False, or
    it is a folder) and rename it to `path`; on any error remove it. A leftover of an earlier
    process with the same id is removed first."""
    tmp = temp_name(path)
    _discard(tmp)
    try:
        yield tmp
        _injected_fault(path)
        if sync and os.path.isfile(tmp):
            fsync_path(tmp)
        os.replace(tmp, os.fspath(path))
    except BaseException:
        _discard(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb", **open_kwargs) -> Iterator[IO]:
    """Open the temporary name of `path` for writing (`mode` "wb" or "w"; `open_kwargs` such as
    newline="" or encoding go to `open`), yield the file object; when the block ends without
    error: flush, fsync, close and rename it to `path`. On any error the temporary is removed and
    `path` is untouched. Permissions follow the umask, as for a plain `open`."""
    if mode not in ("w", "wb", "wt"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path, sync=False) as tmp:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def _writer_alive(pid: int) -> bool:
    """Another live process with this id may still be writing its temporary: leave it alone."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_temporaries(folder: PathLike, only_dead: bool = False) -> List[str]:
    """Delete the files in `folder` named like `atomic_write` temporaries (`.<name>.tmp<pid>`)
    e.g. left by a killed run; returns their names (sorted). Not recursive;
    a missing folder or a file that cannot be removed is skipped. `only_dead`: keep those whose
    writer (the pid in the name) is a live process other than this one, e.g. `of-face plot`
    redrawing beside a run."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return []
    removed = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        m = TEMP_RE.match(name)
        if m and os.path.isfile(path) and not (only_dead and _writer_alive(int(m.group(1)))):
            try:
                os.remove(path)
                removed.append(name)
            except OSError:
                pass
    return removed


def check_output(path: PathLike, flag: str, what: str = "file") -> None:
    """Refuse an output path that cannot be written, before any slow work: a folder given for a
    file, a path through a file (exit code 2), or a folder (or its nearest existing parent, for
    folders still to be made) where no file can be created (exit code 1)."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise ToolError(f"{flag} {path}: is a folder; expected the {what} to write")
    folder = os.path.dirname(path)
    while not os.path.exists(folder):  # folders still to be made go into the nearest existing one
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise ToolError(f"{flag} {path}: {folder} is a file, not a folder; expected a path in a folder")
    try:  # os.access says yes to root on a read-only mount: create a file to know
        fd, probe = tempfile.mkstemp(prefix=".of_face_probe", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ToolError(f"{flag} {path}: cannot write in {folder} ({e.strerror}); expected a writable folder",
                        code=RUNTIME) from None


def complete_part(path: str) -> Tuple[bytes, str]:
    """(a CSV file's bytes up to its last complete row, what was after it: "" when nothing).
    A run killed mid-append leaves a partial last row, or NUL bytes where the file grew but the
    data never reached the disk."""
    with open(path, "rb") as f:
        data = f.read()
    end = data.find(b"\0")
    kept = data if end < 0 else data[:end]
    if kept and not kept.endswith(b"\n"):
        kept = kept[:kept.rfind(b"\n") + 1]
    if len(kept) == len(data):
        return data, ""
    return kept, "NUL bytes" if end >= 0 else "a partial last row"


def row_count(kept: bytes) -> int:
    return max(kept.count(b"\n") - 1, 0)  # the header is not a row


def cut_where(path: str, kept: bytes, what: str) -> str:
    line = kept.count(b"\n") + 1
    return f"warning: {path}: cut short at line {line} ({what}: a run that crashed while writing it?); "


def cut_to_complete_rows(path: str, warn: Callable[[str], None]) -> bool:
    """Cut a CSV file (metrics.csv) back to its last complete row, atomically, the bytes before it unchanged
    (`warn` says so); returns whether anything (a header at least) is left. For writers that are
    about to append or rewrite it."""
    kept, what = complete_part(path)
    if what:
        with atomic_write(path) as f:
            f.write(kept)
        warn(cut_where(path, kept, what) + f"cut back to the {row_count(kept)} complete row(s) before it")
    return bool(kept)
