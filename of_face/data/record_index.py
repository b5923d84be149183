"""The index of a RecordIO set as numpy arrays, built once and cached: what start-up needs without
a pass over the images.

    keys, offsets   int64 [records]: the .idx file, sorted by key (np.searchsorted finds a record)
    ids             int64 [images]: the image records, in dataset order
    labels          int64 [images]: the class of each image

Labels come from insightface's identity-range records when the set has them (record 0's label
[a, b]: records a..b-1 each hold the [first, one past last] image records of one class; a sample
of image headers is checked against them), else from one pass over the image headers. The arrays
are cached in `<rec stem>.of_face_index.npz` beside the data, or, when that folder is read-only,
in `$XDG_CACHE_HOME/of_face/index/` (default ~/.cache), keyed by the size and mtime of the .rec and
.idx: a changed file rebuilds it. A 1M-record set's index is about 32 MB in memory.

Labels are float32 on disk (mxnet's IRHeader and its label vectors), which holds every integer
only up to 2**24: 2**24 + 1 reads back as 2**24. So a RecordIO set can name at most 2**24 classes
(ids 0 .. 2**24 - 1); a label read as 2**24 or more may be another id rounded, and is refused
(`class_id`) rather than merged. Everything after the header is int64.
"""
import hashlib
import math
import os
import struct
from collections import namedtuple
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from of_face.io import atomic_write

CACHE_VERSION = 1
RECORD_MAGIC = 0xCED7230A
IR_FORMAT = "<IfQQ"  # mxnet's IRHeader: uint32 flag, float32 label, uint64 id, uint64 id2
IR_SIZE = struct.calcsize(IR_FORMAT)
IRHeader = namedtuple("IRHeader", ["flag", "label", "id", "id2"])  # as mx.recordio's
FLOAT32_EXACT = 2 ** 24  # float32 holds every integer up to this one; RecordIO class ids stay below it
BIG_SET_HINT = ("a set of more classes needs int64 labels: keep it as image folders with a label.txt "
                "(Data.dataset=folder)")


def class_id(value, rec_path, record_id) -> int:
    """The class id a float32 header label stands for; refused when it is not a whole number or
    float32 may have rounded it (2**24 or more: 2**24 + 1 and 2**24 read back alike)."""
    v = float(value)
    if not math.isfinite(v) or v != math.floor(v):
        raise ValueError(f"{rec_path}: record {record_id} has label {v}, expected a whole class id")
    if v >= FLOAT32_EXACT:
        raise ValueError(f"{rec_path}: record {record_id} has label {int(v)}, expected a class id below "
                         f"{FLOAT32_EXACT:,} (2**24): RecordIO stores labels as float32, which cannot tell "
                         f"larger ids apart; {BIG_SET_HINT}")
    return int(v)


def check_class_count(num_classes: int, where) -> int:
    """`num_classes` if float32 labels can name them all, else a ValueError naming `where`."""
    if num_classes > FLOAT32_EXACT:
        raise ValueError(f"{where}: {num_classes:,} classes, expected at most {FLOAT32_EXACT:,} (2**24): "
                         f"RecordIO stores labels as float32, which cannot tell ids above 2**24 apart "
                         f"(2**24 + 1 reads as 2**24); {BIG_SET_HINT}")
    return num_classes


def parse_idx(idx_path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """(keys, offsets) of an .idx file ("key<TAB>offset" lines), sorted by key."""
    text = idx_path.read_bytes()
    values = np.fromstring(text, dtype=np.int64, sep=" ")  # any whitespace separates
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(values) != 2 * len(lines):  # a malformed line: name it
        for line_no, line in enumerate(text.decode(errors="replace").splitlines(), 1):
            parts = line.split("\t")
            if line.strip() and (len(parts) != 2 or not all(p.strip().lstrip("-").isdigit() for p in parts)):
                raise ValueError(f"{idx_path}: line {line_no} is not 'key<TAB>offset': {line!r}")
        raise ValueError(f"{idx_path}: not a RecordIO index")
    if not len(values):
        raise ValueError(f"{idx_path}: index is empty")
    keys, offsets = values[0::2], values[1::2]
    order = np.argsort(keys, kind="stable")
    return np.ascontiguousarray(keys[order]), np.ascontiguousarray(offsets[order])


def read_record(f, offset: int, rec_path, record_id: int) -> bytes:
    """The payload of the record at `offset` of the open .rec file (dmlc RecordIO: uint32 magic,
    uint32 cflag << 29 | length, payload padded to 4 bytes; a record the writer split at a magic
    number in its payload comes in parts, cflag 1 / 2 / 3, rejoined with that magic)."""
    f.seek(offset)
    parts = []
    while True:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{rec_path}: record {record_id} is truncated")
        magic, lrec = struct.unpack("<II", head)
        if magic != RECORD_MAGIC:
            raise ValueError(f"{rec_path}: record {record_id} does not start with the RecordIO magic "
                             f"(is {Path(rec_path).with_suffix('.idx').name} the index of this file?)")
        cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
        data = f.read(length)
        if len(data) < length:
            raise ValueError(f"{rec_path}: record {record_id} is truncated")
        parts.append(data)
        if cflag in (0, 3):
            return struct.pack("<I", RECORD_MAGIC).join(parts)
        f.seek((4 - length % 4) % 4, os.SEEK_CUR)


def unpack(raw: bytes, rec_path, record_id: int) -> Tuple[IRHeader, bytes]:
    """(header, image bytes) of a record's payload, as mx.recordio.unpack."""
    try:
        flag, label, id1, id2 = struct.unpack(IR_FORMAT, raw[:IR_SIZE])
        payload = raw[IR_SIZE:]
        if flag > 0:
            label = np.frombuffer(payload[:4 * flag], np.float32)
            if len(label) < flag:
                raise struct.error("label vector cut short")
            payload = payload[4 * flag:]
    except struct.error as err:
        raise ValueError(f"{rec_path}: record {record_id} has a broken header ({err})") from None
    return IRHeader(flag, label, id1, id2), payload


def read_label(f, offset: int, rec_path, record_id: int) -> int:
    """The class of the record at `offset`, from its header alone (the image is not read)."""
    f.seek(offset)
    raw = f.read(8 + IR_SIZE + 4)
    if len(raw) < 8 + IR_SIZE:
        raise ValueError(f"{rec_path}: record {record_id} is truncated")
    magic, _ = struct.unpack("<II", raw[:8])
    if magic != RECORD_MAGIC:
        raise ValueError(f"{rec_path}: record {record_id} does not start with the RecordIO magic "
                         f"(is {Path(rec_path).with_suffix('.idx').name} the index of this file?)")
    flag, label, _, _ = struct.unpack(IR_FORMAT, raw[8:8 + IR_SIZE])
    if flag > 0:  # vector label stored after the header; its first element is the class
        (label,) = struct.unpack("<f", raw[8 + IR_SIZE:8 + IR_SIZE + 4])
    return class_id(label, rec_path, record_id)


def header_class(header: IRHeader, rec_path, record_id: int) -> int:
    """The class id of an unpacked record (a scalar label, or the first of a label vector)."""
    label = header.label
    if np.ndim(label) and len(label) == 0:
        raise ValueError(f"{rec_path}: record {record_id} has an empty label vector, expected a class id")
    return class_id(label[0] if np.ndim(label) else label, rec_path, record_id)


def _stamp(*paths: Path) -> np.ndarray:
    return np.array([[os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in paths], np.int64)


def cache_path(rec_path: Path) -> Path:
    """Beside the data if that folder is writable, else the user's cache folder."""
    folder = rec_path.parent
    # a folder with no write bit counts as read-only even for root (whom os.access lets write)
    if os.access(folder, os.W_OK) and os.stat(folder).st_mode & 0o222:
        return folder / f"{rec_path.stem}.of_face_index.npz"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "of_face" / "index"
    return base / f"{hashlib.sha1(str(rec_path.resolve()).encode()).hexdigest()[:16]}.npz"


def load_or_build(rec_path: Path, idx_path: Path, log: Optional[Callable[[str], None]] = None,
                  need_labels: bool = True) -> Dict[str, np.ndarray]:
    """The index arrays, from the cache when it matches the files, else built (and cached once it
    has labels). Without `need_labels` a set with no identity ranges gets no "labels" entry (the
    pass over its headers waits for `with_labels`)."""
    cache, index = cache_path(rec_path), None
    try:
        with np.load(cache) as f:
            if (int(f["version"]) == CACHE_VERSION and np.array_equal(f["stamp"], _stamp(rec_path, idx_path))
                    and f["labels"].dtype == np.int64):
                index = {k: f[k] for k in ("keys", "offsets", "ids", "labels")}
    except (OSError, KeyError, ValueError):
        pass
    if index is not None:
        _check_labels(index["labels"], rec_path)  # a cache written before labels were checked
        return index
    index = build(rec_path, idx_path)
    return with_labels(rec_path, idx_path, index, log) if need_labels or "labels" in index else index


def with_labels(rec_path: Path, idx_path: Path, index: Dict[str, np.ndarray],
                log: Optional[Callable[[str], None]] = None) -> Dict[str, np.ndarray]:
    """`index` with its labels (one pass over the image headers if it has none yet), cached."""
    if "labels" not in index:
        keys, offsets = index["keys"], index["offsets"]
        with open(rec_path, "rb") as f:
            index = dict(index, labels=np.fromiter(
                (read_label(f, int(offsets[np.searchsorted(keys, i)]), rec_path, int(i)) for i in index["ids"]),
                np.int64, len(index["ids"])))
    _check_labels(index["labels"], rec_path)  # labels from the identity ranges are counted, not read
    cache = cache_path(rec_path)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(cache) as fh:
            np.savez(fh, version=CACHE_VERSION, stamp=_stamp(rec_path, idx_path), **index)
    except OSError as e:  # no cache: still correct, only slower next time
        if log:
            log(f"note: could not cache the label index at {cache} ({e.strerror})")
    return index


def _check_labels(labels: np.ndarray, rec_path) -> None:
    if len(labels):
        check_class_count(int(labels.max()) + 1, rec_path)


def build(rec_path: Path, idx_path: Path) -> Dict[str, np.ndarray]:
    keys, offsets = parse_idx(idx_path)
    size = os.path.getsize(rec_path)
    last = int(np.argmax(offsets))
    if offsets[last] >= size:  # a .rec cut short (or an .idx of another file): say so up front
        raise ValueError(f"{rec_path}: truncated or not matching {idx_path} (record {keys[last]} starts at byte "
                         f"{offsets[last]}, the file has {size} bytes)")

    def has(record_id):
        i = int(np.searchsorted(keys, record_id))
        return i < len(keys) and keys[i] == record_id

    def find(record_id):
        if not has(record_id):
            raise ValueError(f"{rec_path}: record {record_id} is not in {idx_path}")
        return int(offsets[np.searchsorted(keys, record_id)])

    with open(rec_path, "rb") as f:
        def header(record_id):
            return unpack(read_record(f, find(record_id), rec_path, record_id), rec_path, record_id)

        first, payload = header(0) if len(keys) and keys[0] == 0 else (None, None)
        # insightface's header carries a vector label and no image (a headerless file whose first
        # image has a vector label has flag > 0 too, but a payload)
        if first is not None and first.flag > 0 and len(payload) == 0:
            a, b = int(first.label[0]), int(first.label[1]) if len(first.label) > 1 else 0

            def kind(record_id):  # "image", "range" (no payload) or None (not in the .idx)
                return ("range" if len(header(record_id)[1]) == 0 else "image") if has(record_id) else None
            # past 2**24 records (Glint360K has 17M images) a and b are float32-rounded: the true
            # ones are where the images end and the range records begin / end
            a = _true_record_id(a, lambda k: kind(k - 1) == "image" and kind(k) != "image")
            b = _true_record_id(b, lambda k: kind(k - 1) == "range" and kind(k) != "range") if b > a else b
            ids = np.arange(1, a, dtype=np.int64)
            for missing in (1, a - 1):
                if not has(missing):
                    raise ValueError(f"{rec_path}: header says images are records 1..{a - 1}, "
                                     f"but record {missing} is not in {idx_path}")
            labels = _labels_from_ranges(header, lambda i: read_label(f, find(i), rec_path, i), ids, a, b)
        else:
            ids, labels = keys.copy(), None
    index = {"keys": keys, "offsets": offsets, "ids": ids}
    return index if labels is None else dict(index, labels=labels)


def _slack(stored: int) -> int:
    """How far the integer a float32 reads back as may lie from the one written: 0 below 2**24,
    1 below 2**25 (2**24 itself may be 2**24 + 1 rounded), 2 below 2**26, ..."""
    if stored < FLOAT32_EXACT:
        return 0
    return 1 << (int(stored).bit_length() - FLOAT32_EXACT.bit_length())


def _true_record_id(stored: int, fits: Callable[[int], bool]) -> int:
    """The record id a float32-rounded `stored` stands for: the nearest one within its rounding for
    which `fits` holds (`stored` itself when exact, or when none fits)."""
    slack = _slack(stored)
    for k in sorted(range(stored - slack, stored + slack + 1), key=lambda k: (abs(k - stored), k)):
        if slack == 0 or (k > 0 and fits(k)):
            return k
    return stored


def _around(bounds: np.ndarray, a: int) -> np.ndarray:
    """The image records (1..a-1) within float32's rounding of some rounded range bound, once each."""
    if not len(bounds):
        return bounds
    slack = np.array([_slack(int(v)) for v in bounds], np.int64)
    ids = np.concatenate([(bounds[slack == s][:, None] + np.arange(-s, s + 1)).ravel() for s in np.unique(slack)])
    ids = np.unique(ids)
    return ids[(ids >= 1) & (ids < a)]


def _labels_from_ranges(header, label_of, ids, a, b) -> Optional[np.ndarray]:
    """Labels from the identity-range records a..b-1, None when they are absent or do not
    describe the images exactly (then the caller reads every image header)."""
    if b <= a:
        return None
    labels = np.full(len(ids), -1, np.int64)
    near = []  # rounded range bounds: images next to them may have been put in the neighbouring class
    try:
        for cls, record_id in enumerate(range(a, b)):
            h, _ = header(record_id)
            lo, hi = (int(h.label[0]), int(h.label[1])) if np.ndim(h.label) and len(h.label) >= 2 else (0, 0)
            if not 1 <= lo <= hi <= a + _slack(a):
                return None
            lo, hi = min(lo, a), min(hi, a)
            labels[lo - 1:hi - 1] = cls
            if _slack(lo):
                near.append(lo)
    except ValueError:
        return None
    for record_id in _around(np.array(near, np.int64), a):  # images 0..a-2 are records 1..a-1
        labels[record_id - 1] = label_of(int(record_id))  # its own header label (exact: < 2**24)
    if (labels < 0).any():
        return None
    rng = np.random.default_rng(0)  # the ranges' class must be the images' own label: check a sample
    sample = np.unique(np.concatenate([[0, len(ids) - 1], rng.integers(0, len(ids), 64)]))
    if any(label_of(int(ids[i])) != labels[i] for i in sample):
        return None
    return labels
