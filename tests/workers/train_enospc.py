"""`of_face.train.main`, but the disk is "full" when checkpoint FAIL_STEP is written.

argv: FAIL_STEP -c CONFIG [-o Section.key=value ...]. The write of ckpt-<FAIL_STEP> gets half
its bytes into the temporary file, then fails with ENOSPC, as a full disk does; every other
write is real. tests/test_checkpoint_errors.py runs it on 2 ranks.
"""
import errno
import os
import sys

from of_face import checkpoint
from of_face.io import atomic_write

FAIL_STEP = int(sys.argv.pop(1))
real_write = checkpoint._write_npz


def write_until_full(path, arrays):
    if os.path.basename(path).startswith(checkpoint.checkpoint_name(FAIL_STEP).split(".")[0]):
        with atomic_write(path) as fh:
            fh.write(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    real_write(path, arrays)


checkpoint._write_npz = write_until_full

from of_face.train.main import main  # noqa: E402  (after the patch, as a real run would import it)

main()
