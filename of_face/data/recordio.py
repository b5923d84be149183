"""Read face images from MXNet indexed RecordIO files (.rec + .idx), insightface layout.

Two layouts exist in the wild:

* insightface packers: record 0 is a header with ``flag > 0`` and ``label = [a, b]``; the images are
  records ``1 .. a-1`` and records ``a .. b-1`` are per-identity ranges (no image payload).
* plain ``im2rec`` output: no header; every key in the ``.idx`` file is an image. Record 0 counts as
  the insightface header only if it has ``flag > 0`` and an empty payload.

Labels may be a scalar or a vector; the first element is the class id.
"""
import io
import os
import struct
from pathlib import Path

import numpy as np
from PIL import Image

# Layout of one dmlc RecordIO record: uint32 magic, uint32 (cflag << 29 | length), payload.
# The payload of an image record starts with mxnet's IRHeader: uint32 flag, float32 label,
# uint64 id, uint64 id2; when flag > 0, `flag` float32 labels follow.
_RECORD_MAGIC = 0xCED7230A
_IR_FORMAT = "<IfQQ"
_IR_SIZE = struct.calcsize(_IR_FORMAT)


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

    ``dataset[i]`` returns ``(uint8 HxWx3 RGB array, int label)``. The MXNet reader is opened lazily
    in each process and is never pickled, so the dataset can be sent to loader worker processes.
    Images must have ``image_size`` (H, W) (default: the `property` file's, if any) unless ``resize``
    (then PIL bilinear resize to it).
    """

    def __init__(self, root_or_rec_path, resize=False, image_size=None):
        self.rec_path, self.idx_path, property_path = _resolve_paths(root_or_rec_path)
        self.resize = resize
        self._reader = None
        self._reader_pid = None
        self._labels = None
        # Offsets straight from the .idx file: labels() reads headers with them, without mxnet.
        self._offsets = self._read_index(self.idx_path)
        # A .rec cut short (or an .idx from another file) points past the end: say so up front
        # instead of failing on some later batch.
        size = os.path.getsize(self.rec_path)
        last_key = max(self._offsets, key=self._offsets.get)
        if self._offsets[last_key] >= size:
            raise ValueError(f"{self.rec_path}: truncated or not matching {self.idx_path} (record {last_key} "
                             f"starts at byte {self._offsets[last_key]}, the file has {size} bytes)")

        header, payload = self._read_record(0) if 0 in self._offsets else (None, None)
        # insightface's header carries a vector label and no image. Testing the payload too keeps a
        # headerless file whose first image has a vector label (flag > 0 as well) from being misread.
        if header is not None and header.flag > 0 and len(payload) == 0:
            first_range = int(header.label[0])
            self.ids = np.arange(1, first_range, dtype=np.int64)
            missing = [i for i in (1, first_range - 1) if i not in self._offsets]
            if missing:
                raise ValueError(f"{self.rec_path}: header says images are records 1..{first_range - 1}, "
                                 f"but record {missing[0]} is not in {self.idx_path}")
        else:
            self.ids = np.array(sorted(self._offsets), dtype=np.int64)

        prop = _read_property(property_path)
        self.image_shape = None if prop is None else (prop[1], prop[2], 3)
        if image_size is not None:
            self.image_shape = (int(image_size[0]), int(image_size[1]), 3)
        self.num_classes = prop[0] if prop is not None else int(self.labels().max()) + 1

    # ----- reading -------------------------------------------------------------------------
    @staticmethod
    def _read_index(idx_path):
        offsets = {}
        with open(idx_path) as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    key, offset = line.split("\t")
                    offsets[int(key)] = int(offset)
                except ValueError:
                    raise ValueError(f"{idx_path}: line {line_no} is not 'key<TAB>offset': {line!r}") from None
        if not offsets:
            raise ValueError(f"{idx_path}: index is empty")
        return offsets

    @property
    def _record_io(self):
        # Reopen after a fork: a file handle shared with the parent would share its file position.
        if self._reader is None or self._reader_pid != os.getpid():
            import mxnet as mx  # imported here so that importing this module stays cheap
            self._reader = mx.recordio.MXIndexedRecordIO(str(self.idx_path), str(self.rec_path), "r")
            self._reader_pid = os.getpid()
        return self._reader

    def _read_record(self, record_id):
        import mxnet as mx
        try:
            raw = self._record_io.read_idx(int(record_id))
        except KeyError:
            raise ValueError(f"{self.rec_path}: record {record_id} is not in {self.idx_path}") from None
        except mx.base.MXNetError:  # the file ends inside the record's payload
            raise ValueError(f"{self.rec_path}: record {record_id} is truncated") from None
        if raw is None:  # mxnet returns None when the file ends inside the record
            raise ValueError(f"{self.rec_path}: record {record_id} is truncated")
        try:
            return mx.recordio.unpack(raw)
        except struct.error as err:
            raise ValueError(f"{self.rec_path}: record {record_id} has a broken header ({err})") from None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_reader"] = None  # the mxnet handle wraps a C pointer: each process opens its own
        state["_reader_pid"] = None
        return state

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        record_id = int(self.ids[index])
        header, payload = self._read_record(record_id)
        label = header.label
        label = int(label[0]) if np.ndim(label) else int(label)
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
        """Class label of every image (int64, dataset order), read from record headers only."""
        if self._labels is None:
            labels = np.empty(len(self.ids), dtype=np.int64)
            with open(self.rec_path, "rb") as f:
                for n, record_id in enumerate(self.ids):
                    labels[n] = self._label_at(f, int(record_id))
            self._labels = labels
        return self._labels.copy()

    def _label_at(self, f, record_id):
        f.seek(self._offsets[record_id])
        raw = f.read(8 + _IR_SIZE + 4)
        if len(raw) < 8 + _IR_SIZE:
            raise ValueError(f"{self.rec_path}: record {record_id} is truncated")
        magic, _ = struct.unpack("<II", raw[:8])
        if magic != _RECORD_MAGIC:
            raise ValueError(f"{self.rec_path}: record {record_id} does not start with the RecordIO magic "
                             f"(is {self.idx_path} the index of this file?)")
        flag, label, _, _ = struct.unpack(_IR_FORMAT, raw[8:8 + _IR_SIZE])
        if flag > 0:  # vector label stored after the header; its first element is the class
            (label,) = struct.unpack("<f", raw[8 + _IR_SIZE:8 + _IR_SIZE + 4])
        return int(label)

    def __repr__(self):
        return f"RecordDataset({str(self.rec_path)!r}, images={len(self)}, classes={self.num_classes})"
