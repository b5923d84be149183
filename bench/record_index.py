"""Start-up of a large RecordIO set: time and memory until labels and the first image are ready.

    python bench/record_index.py [--records 1000000] [--per-id 10] [--root /tmp/of_face_rec1m]

Generates (once) an insightface-layout set: record 0 header, N image records (one tiny 8x8 JPEG,
the same bytes each time), one identity-range record per class, `property`. Then measures, each
in a fresh process (what one rank does at start-up): RecordDataset(root) + labels() + dataset[0],
wall time and the process's RSS growth over the span (after it and at its peak, sampled every
2 ms), for

  before   of_face/data/recordio.py as of commit 0aabdc5 (header read of every record, dict index,
           mxnet's reader and its own dict index on the first image)
  first    this version, no cache yet (labels from the identity ranges, index built and cached)
  second   this version, cache present
With `--headerless` (another --root) the set has no header or ranges: the first start reads
every image header once (then cached).
"""
import argparse
import io
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEFORE = "0aabdc5"


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def generate(root, records, per_id, headerless):
    import mxnet as mx
    from PIL import Image

    if os.path.isfile(os.path.join(root, "property")):
        return
    os.makedirs(root, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(buf, format="JPEG")
    jpeg = buf.getvalue()
    classes = records // per_id
    w = mx.recordio.MXIndexedRecordIO(os.path.join(root, "train.idx"), os.path.join(root, "train.rec"), "w")
    first = 0 if headerless else 1
    if not headerless:
        w.write_idx(0, mx.recordio.pack(mx.recordio.IRHeader(0, [records + 1, records + 1 + classes], 0, 0), b""))
    for i in range(records):
        w.write_idx(first + i, mx.recordio.pack(mx.recordio.IRHeader(0, float(i // per_id), first + i, 0), jpeg))
    if not headerless:
        for c in range(classes):
            key = records + 1 + c
            w.write_idx(key, mx.recordio.pack(mx.recordio.IRHeader(0, [1 + c * per_id, 1 + (c + 1) * per_id], key, 0),
                                              b""))
    w.close()
    with open(os.path.join(root, "property"), "w") as f:
        f.write(f"{classes},8,8\n")


def child(mode, root):
    """One start-up, in this process: prints a JSON row."""
    sys.path.insert(0, REPO)
    if mode == "before":
        import importlib.util

        src = subprocess.run(["git", "show", f"{BEFORE}:of_face/data/recordio.py"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout
        path = "/tmp/of_face_recordio_before.py"
        with open(path, "w") as f:
            f.write(src)
        spec = importlib.util.spec_from_file_location("recordio_before", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        import mxnet  # noqa: F401  (the old reader's import, outside the measured span)
        cls = module.RecordDataset
    else:
        from of_face.data.recordio import RecordDataset as cls
    base = rss()
    peak = [base]
    done = threading.Event()

    def sample():  # peak RSS within the measured span (ru_maxrss would include the imports)
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.time()
    ds = cls(root, image_size=(8, 8))
    labels = ds.labels()
    ds[0]
    seconds = time.time() - t0
    done.set()
    sampler.join()
    peak = max(peak[0], rss())
    print(json.dumps({"mode": mode, "images": len(ds), "classes": int(labels.max()) + 1, "seconds": round(seconds, 2),
                      "rss_growth_MB": round((rss() - base) / 1e6, 1), "peak_growth_MB": round((peak - base) / 1e6, 1),
                      "base_rss_MB": round(base / 1e6, 1)}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--per-id", type=int, default=10)
    ap.add_argument("--root", default="/tmp/of_face_rec1m")
    ap.add_argument("--headerless", action="store_true")
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.root)
    t0 = time.time()
    generate(args.root, args.records, args.per_id, args.headerless)
    print(f"set: {args.root} ({args.records} records, {time.time() - t0:.0f}s to generate or find)", flush=True)
    for name in os.listdir(args.root):  # no cache before the first start
        if name.endswith(".of_face_index.npz"):
            os.remove(os.path.join(args.root, name))
    for mode in ("before", "first", "second"):
        subprocess.run([sys.executable, __file__, "--child", mode, "--root", args.root], check=True)


if __name__ == "__main__":
    main()
