"""P4: decoded + augmented images/s from an insightface RecordIO set.

    python bench/loader.py [REC_DIR]     (default ../shared/data/glint14)

Rows: a plain single-process loop over mxnet.recordio + PIL (the floor), then ShardedLoader
(one rank, batch 64, flip, normalise) with 0, 1 and 2 worker processes. One pass over the set
each, after a warm-up batch.
"""
import io
import sys
import time

import mxnet as mx
import numpy as np
from PIL import Image

from of_face.data.loader import ShardedLoader
from of_face.data.recordio import RecordDataset

root = sys.argv[1] if len(sys.argv) > 1 else "../shared/data/glint14"


def plain_loop():
    rec = mx.recordio.MXIndexedRecordIO(f"{root}/train.idx", f"{root}/train.rec", "r")
    header, _ = mx.recordio.unpack(rec.read_idx(0))
    ids = range(1, int(header.label[0]))
    start = time.time()
    for i in ids:
        _, payload = mx.recordio.unpack(rec.read_idx(i))
        x = np.asarray(Image.open(io.BytesIO(payload)).convert("RGB"), np.float32)
        x = (x[:, ::-1] / 255.0 - 0.5) / 0.5
    return len(ids) / (time.time() - start)


def loader(workers):
    ds = RecordDataset(root)
    ld = ShardedLoader(ds, 64, 0, 1, seed=0, num_workers=workers)
    it = iter(ld)
    next(it)  # warm-up: worker start
    start, n = time.time(), 0
    for images, _ in it:
        n += len(images)
    ld.close()
    return n / (time.time() - start)


print(f"plain mxnet.recordio + PIL loop: {plain_loop():.0f} images/s")
for w in (0, 1, 2):
    print(f"ShardedLoader num_workers={w}: {loader(w):.0f} images/s")
