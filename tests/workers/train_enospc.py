"""`of_face.train.main`, but the disk is "full" when checkpoint FAIL_STEP is written.

argv: FAIL_STEP FAIL_RANK -c CONFIG [-o Section.key=value ...]. The write of ckpt-<FAIL_STEP>
(the one file of rank 0, or with Global.checkpoint_format=sharded rank FAIL_RANK's FC shard) gets
half its bytes into the temporary file, then fails with ENOSPC, as a full disk does; every other
write is real. tests/test_checkpoint_errors.py runs it on 2 ranks.
"""
import errno
import os
import sys

from of_face import parallel
from of_face.run import checkpoint
from of_face.run import shards as checkpoint_shards
from of_face.io import atomic_write

FAIL_STEP, FAIL_RANK = int(sys.argv.pop(1)), int(sys.argv.pop(1))
real_write = checkpoint._write_npz
real_write_rows = checkpoint_shards.write_rows


def write_until_full(path, arrays):
    if os.path.basename(path).startswith(checkpoint.checkpoint_name(FAIL_STEP).split(".")[0]):
        with atomic_write(path) as fh:
            fh.write(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    real_write(path, arrays)


def write_rows_until_full(tmp, key, rank, rows):
    if f".ckpt-{FAIL_STEP:08d}.partial" in tmp and parallel.rank() == FAIL_RANK:
        path = os.path.join(tmp, checkpoint_shards.shard_file(key, rank))
        with atomic_write(path) as fh:
            fh.write(b"\x93NUMPY half a shard")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    real_write_rows(tmp, key, rank, rows)


checkpoint._write_npz = write_until_full
checkpoint_shards.write_rows = write_rows_until_full

from of_face.train.main import main  # noqa: E402  (after the patch, as a real run would import it)

main()
