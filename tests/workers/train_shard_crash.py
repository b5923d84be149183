"""`of_face.train.main`, but rank CRASH_RANK dies (SIGKILL, as an OOM kill does) while writing its
FC shard of the sharded checkpoint at step CRASH_STEP, after the other ranks may have written theirs.

argv: CRASH_STEP CRASH_RANK -c CONFIG [-o Section.key=value ...].
"""
import os
import signal
import sys

from of_face import parallel
from of_face.run import shards as checkpoint_shards

CRASH_STEP, CRASH_RANK = int(sys.argv.pop(1)), int(sys.argv.pop(1))
real_write_rows = checkpoint_shards.write_rows


def write_rows_then_die(tmp, key, rank, rows):
    if f".ckpt-{CRASH_STEP:08d}.partial" in tmp and parallel.rank() == CRASH_RANK:
        with open(os.path.join(tmp, checkpoint_shards.shard_file(key, rank)), "wb") as f:
            f.write(b"\x93NUMPY half a shard")
        os.kill(os.getpid(), signal.SIGKILL)
    real_write_rows(tmp, key, rank, rows)


checkpoint_shards.write_rows = write_rows_then_die

from of_face.train.main import main  # noqa: E402

main()
