"""Sharded training checkpoints (`Global.checkpoint_format: sharded`): a folder `ckpt-<step>/`.

    main.npz                      rank 0: everything of the one-file format (of_face/run/checkpoint.py)
                                  except the FC rows: backbone, its optimizer state, graph
                                  variables, RNG states, __meta__ (with the config)
    <key>.rank<r>.npy             rank r: its own real FC rows (no padding rows) of `key`:
                                  model.head.weight, opt.head.weight.<slot>
    manifest.json                 rank 0, written last: format, step, world size, classes, and per
                                  key the files with their row ranges [start, stop)

Every rank writes its own rows, so no rank ever holds more than its shard. All files go into
`.ckpt-<step>.partial/`; once every rank reported success (one collective), rank 0 writes the
manifest there and renames the folder to `ckpt-<step>/`: a `ckpt-*` folder is always complete, and
a crash anywhere before leaves only the `.partial` folder, which the next start removes. Loading
reads, per rank, only the rows it owns in the new world (seek + readinto on the .npy files),
so a checkpoint resumes on any number of ranks. The ranks must share the output folder's
file system (as they share it for the one-file format's reading).
"""
import json
import os
import shutil
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from of_face.io import atomic_write, fsync_path

MANIFEST = "manifest.json"
MAIN = "main.npz"
SHARDED_FORMAT = 2
SHARDED_FROM_BYTES = 1 << 30  # Global.checkpoint_format=auto: sharded once the FP32 FC weight is this big


def resolve_format(setting: str, head) -> str:
    """Global.checkpoint_format -> "npz" | "sharded" (auto: by the size of the whole FC weight)."""
    if setting != "auto":
        return setting
    return "sharded" if head.num_classes * head.weight.shape[-1] * 4 >= SHARDED_FROM_BYTES else "npz"


def partial_dir(path: str) -> str:
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.partial")


def is_sharded(path: str) -> bool:
    return os.path.isdir(path)


def shard_file(key: str, rank: int) -> str:
    return f"{key.replace('/', '.')}.rank{rank}.npy"


def begin(path: str, rank: int) -> str:
    """Every rank: the partial folder this save writes into (rank 0 clears an old one first;
    the caller holds a barrier between the two)."""
    tmp = partial_dir(path)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    return tmp


def write_rows(tmp: str, key: str, rank: int, rows: np.ndarray) -> None:
    with atomic_write(os.path.join(tmp, shard_file(key, rank))) as fh:
        np.save(fh, np.ascontiguousarray(rows))


def write_main(tmp: str, arrays: Dict[str, np.ndarray]) -> None:
    with atomic_write(os.path.join(tmp, MAIN)) as fh:
        np.savez(fh, **arrays)


def finish(path: str, tmp: str, meta: dict, keys: List[str], ranges: Sequence[Tuple[int, int]]) -> None:
    """Rank 0, after every rank's files are written: the manifest, then the folder's rename.
    `ranges`: every rank's [start, stop) of the real class rows (heads/fc_table.py)."""
    shards = {k: [[shard_file(k, r), int(a), int(b)] for r, (a, b) in enumerate(ranges)] for k in keys}
    manifest = {"format": SHARDED_FORMAT, "step": meta["step"], "world_size": len(ranges),
                "num_classes": meta["num_classes"], "shards": shards}
    with atomic_write(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump(manifest, f)
    fsync_path(tmp)
    if os.path.isdir(path):  # the same step saved again (a resumed run): the newer one wins
        old = f"{partial_dir(path)}.old"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    fsync_path(os.path.dirname(path) or ".")


def read_manifest(path: str) -> Optional[dict]:
    """The manifest of a sharded checkpoint folder, None when there is none (incomplete)."""
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def open_main(path: str):
    return np.load(os.path.join(path, MAIN))


def read_rows(path: str, manifest: dict, key: str, start: int, stop: int, out: np.ndarray) -> None:
    """The stored rows [start, stop) of `key` into `out` (e.g. a CPU tensor's own memory). Reads
    only those rows of the shard files, straight into `out` (no memory map whose pages would count
    as a second copy while it lives)."""
    for name, lo, hi in manifest["shards"][key]:
        a, b = max(lo, start), min(hi, stop)
        if a >= b:
            continue
        with open(os.path.join(path, name), "rb") as f:
            version = np.lib.format.read_magic(f)
            shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                     else np.lib.format.read_array_header_2_0(f))
            if dtype != out.dtype:
                raise ValueError(f"{os.path.join(path, name)}: {dtype} rows, expected {out.dtype}")
            row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            f.seek(f.tell() + (a - lo) * row)
            view = memoryview(out[a - start:b - start]).cast("B")
            if f.readinto(view) != len(view):
                raise ValueError(f"{os.path.join(path, name)}: shorter than its header says")


def remove_partials(out_dir: str) -> list:
    """Rank 0 at start (the run folder is locked): the `.ckpt-*.partial` folders of a save that
    never completed."""
    removed = []
    for name in sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []:
        if name.startswith(".ckpt-") and (name.endswith(".partial") or name.endswith(".partial.old")):
            shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
            removed.append(name)
    return removed
