"""Read face images from MXNet indexed RecordIO files (.rec + .idx), insightface layout.

Two layouts exist in the wild:

* insightface packers: record 0 is a header with ``flag > 0`` and ``label = [a, b]``; the images are
  records ``1 .. a-1`` and records ``a .. b-1`` are per-identity ranges (no image payload).
* plain ``im2rec`` output: no header; every key in the ``.idx`` file is an image. Record 0 counts as
  the insightface header only if it has ``flag > 0`` and an empty payload.

Labels may be a scalar or a vector; the first element is the class id. Both are float32 on disk, so
a set may name at most 2**24 classes (record_index.class_id); labels are int64 from there on.
"""
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from of_face.data import record_index


def _resolve_paths(root_or_rec_path):
    """Return (rec, idx, property) paths for a dataset folder or a .rec/.idx file path."""
    path = Path(root_or_rec_path)
    if path.is_dir():
        rec, idx = path / "train.rec", path / "train.idx"
    elif path.suffix in (".rec", ".idx"):
        rec, idx = path.with_suffix(".rec"), path.with_suffix(".idx")
    elif not path.exists():
        raise FileNotFoundError(f"RecordIO dataset not found: {path} (expected a folder or a .rec file)")
    else:
        raise ValueError(f"{path}: expected a folder holding train.rec/train.idx or a .rec file")
    for needed in (rec, idx):
        if not needed.is_file():
            raise FileNotFoundError(f"RecordIO file missing: {needed}")
    return rec, idx, rec.parent / "property"


def _read_property(path):
    """Parse insightface's `property` file ("num_classes,height,width"); None if absent."""
    if not path.is_file():
        return None
    fields = path.read_text().strip().split(",")
    try:
        return tuple(int(f) for f in fields)
    except ValueError:
        raise ValueError(f"{path}: expected 'num_classes,height,width', got {path.read_text()!r}") from None


def _reason(err: Exception) -> str:
    """PIL's complaint without the object reprs it puts in (`<_io.BytesIO object at 0x...>`)."""
    if type(err).__name__ == "UnidentifiedImageError":
        return "not a JPEG/PNG/... image"
    text = str(err).split(" <_io.", 1)[0]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class RecordDataset:
    """Random access to (image, label) pairs of an indexed RecordIO face dataset.

    ``dataset[i]`` returns ``(uint8 HxWx3 RGB array, int label)``. Records are read with plain file
    I/O (of_face/data/record_index.py); the file is opened lazily in each process and never pickled,
    so the dataset can be sent to loader worker processes.
    Images must have ``image_size`` (H, W) (default: the `property` file's, if any) unless ``resize``
    (then PIL bilinear resize to it).
    """

    def __init__(self, root_or_rec_path, resize=False, image_size=None, log=None):
        self.rec_path, self.idx_path, property_path = _resolve_paths(root_or_rec_path)
        self.resize = resize
        self._reader = None  # this process's open .rec file (reopened after a fork)
        self._reader_pid = None
        # keys/offsets of the .idx, image ids and labels as numpy arrays, cached beside the data
        # (of_face/data/record_index.py): no pass over the images, no dict of every record
        prop = _read_property(property_path)
        if prop is not None:  # more classes than float32 labels can name: refused before any pass
            record_index.check_class_count(prop[0], property_path)
        self._log = log
        self._index = record_index.load_or_build(self.rec_path, self.idx_path, log, need_labels=prop is None)
        self._keys, self._offsets, self.ids = self._index["keys"], self._index["offsets"], self._index["ids"]

        self.image_shape = None if prop is None else (prop[1], prop[2], 3)
        if image_size is not None:
            self.image_shape = (int(image_size[0]), int(image_size[1]), 3)
        self.num_classes = prop[0] if prop is not None else int(self._index["labels"].max()) + 1

    # ----- reading -------------------------------------------------------------------------
    @property
    def _record_io(self):
        # Reopen after a fork: a file handle shared with the parent would share its file position.
        if self._reader is None or self._reader_pid != os.getpid():
            self._reader = open(self.rec_path, "rb")
            self._reader_pid = os.getpid()
        return self._reader

    def _read_record(self, record_id):
        """(header, payload) of one record, as mx.recordio.unpack gives them."""
        i = int(np.searchsorted(self._keys, record_id))
        if i == len(self._keys) or self._keys[i] != record_id:
            raise ValueError(f"{self.rec_path}: record {record_id} is not in {self.idx_path}")
        raw = record_index.read_record(self._record_io, int(self._offsets[i]), self.rec_path, record_id)
        return record_index.unpack(raw, self.rec_path, record_id)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_reader"] = None  # an open file: each process opens its own
        state["_reader_pid"] = None
        return state

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        record_id = int(self.ids[index])
        header, payload = self._read_record(record_id)
        label = record_index.header_class(header, self.rec_path, record_id)
        try:
            with Image.open(io.BytesIO(payload)) as im:
                im = im.convert("RGB")
        except Exception as err:  # PIL raises several types for corrupt data
            raise ValueError(f"{self.rec_path}: record {record_id} could not be decoded as an image "
                             f"({_reason(err)}); re-pack the set, or set Data.skip_bad_records=true "
                             "to skip and count such records") from None
        expected = self.image_shape  # a bare im2rec file read without image_size has none to hold to
        if expected is not None and im.size != (expected[1], expected[0]):
            if not self.resize:
                raise ValueError(f"{self.rec_path}: record {record_id} is {im.size[0]}x{im.size[1]}, "
                                 f"expected {expected[1]}x{expected[0]} aligned crops "
                                 f"(convert with --resize, or set Data.resize=true)")
            im = im.resize((expected[1], expected[0]), Image.BILINEAR)
        return np.asarray(im), label

    def labels(self):
        """Class label of every image (int64, dataset order), from the index (one pass over the
        record headers the first time for a set without identity ranges; cached)."""
        if "labels" not in self._index:
            self._index = record_index.with_labels(self.rec_path, self.idx_path, self._index, self._log)
        return self._index["labels"].copy()

    def __repr__(self):
        return f"RecordDataset({str(self.rec_path)!r}, images={len(self)}, classes={self.num_classes})"
