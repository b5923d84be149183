"""Read a PyTorch `.pth` state dict without PyTorch, and without running its pickle's code.

`torch.save` (since torch 1.6) writes a zip: `<name>/data.pkl` (a pickle of the state dict in
which every tensor is `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` and
every storage a persistent id `('storage', torch.FloatStorage, key, device, numel)`) plus one
raw little-endian file `<name>/data/<key>` per storage. A pickle may name any importable
callable, so loading one with `pickle.load` runs whatever the file says (`os.system`, ...).
Here the unpickler resolves only the handful of names a state dict needs, each to a local
stand-in that builds a numpy array; any other global stops the read with a message naming the
file and the global. Strides and offsets are checked against the storage size, so a crafted
tensor cannot read outside its storage either.

The pre-1.6 (non-zip) format is refused with a message saying how to re-save the file.
"""
import collections
import pickle
import zipfile
from typing import Any, Dict

import numpy as np


class WeightsFileError(ValueError):
    """A weights file that cannot be imported: one line naming the file and what is wrong."""


# torch storage class name -> numpy dtype of its raw bytes (bfloat16 is widened below)
STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": np.uint16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _StorageType:
    """Stands for `torch.<X>Storage` in the pickle: only its name is used."""

    def __init__(self, name: str):
        self.name = name


class _Storage:
    """One raw storage of the zip, read lazily (a tensor may view part of a shared storage)."""

    def __init__(self, array: np.ndarray):
        self.array = array


def _rebuild_tensor(storage, offset, size, stride, *unused) -> np.ndarray:
    """numpy twin of torch._utils._rebuild_tensor_v2 (requires_grad, hooks, metadata ignored)."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor whose storage is not a storage record")
    base = storage.array
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or int(offset) < 0 or min(size + stride, default=0) < 0:
        raise pickle.UnpicklingError(f"tensor with invalid layout size {size} stride {stride} offset {offset}")
    if 0 in size:
        return np.zeros(size, base.dtype)
    last = int(offset) + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= base.size:  # a crafted layout reaching past its storage
        raise pickle.UnpicklingError(f"tensor of size {size} stride {stride} offset {offset} reads past its "
                                     f"storage of {base.size} elements")
    view = np.lib.stride_tricks.as_strided(base[int(offset):], shape=size,
                                           strides=[s * base.itemsize for s in stride])
    return np.array(view)  # own contiguous copy


def _rebuild_parameter(data, requires_grad=None, hooks=None, *unused) -> np.ndarray:
    return data


def _ordered_dict(*args) -> "collections.OrderedDict":
    return collections.OrderedDict(*args)


# The only globals a state dict's pickle may name -> what they resolve to here.
ALLOWED = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, fh, path: str, read_storage):
        super().__init__(fh)
        self.path, self.read_storage, self.storages = path, read_storage, {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED:
            return ALLOWED[(module, name)]
        raise WeightsFileError(
            f"{self.path}: refusing pickle global '{module}.{name}' (only a state dict of tensors is read: "
            f"torch.load would call it; for a whole pickled model, save model.state_dict() instead)")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise WeightsFileError(f"{self.path}: unexpected persistent id {str(pid)[:80]!r} in the pickle")
        _, kind, key, _device, numel = pid[:5]
        if key not in self.storages:
            self.storages[key] = _Storage(self.read_storage(str(key), kind.name, int(numel)))
        return self.storages[key]


def _zip_prefix(names) -> str:
    pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
        raise KeyError("no <name>/data.pkl")
    return pkl[0][: -len("data.pkl")]


def read_pth(path: str) -> Dict[str, Any]:
    """The object a `.pth` holds (usually an OrderedDict {name: numpy array}), read without torch."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as e:
        raise WeightsFileError(f"{path}: cannot read ({e.strerror})") from None
    if not head.startswith(b"PK"):
        raise WeightsFileError(
            f"{path}: not a zip-format PyTorch file (the pre-1.6 format, or not a .pth at all); re-save it "
            f"with torch>=1.6: torch.save(torch.load(f), f)")
    try:
        with zipfile.ZipFile(path) as zf:
            prefix = _zip_prefix(zf.namelist())
            big_endian = False
            if prefix + "byteorder" in zf.namelist():
                big_endian = zf.read(prefix + "byteorder").strip() == b"big"

            def read_storage(key: str, kind: str, numel: int) -> np.ndarray:
                dtype = np.dtype(STORAGE_DTYPES[kind]).newbyteorder(">" if big_endian else "<")
                raw = zf.read(f"{prefix}data/{key}")
                if len(raw) < numel * dtype.itemsize:
                    raise WeightsFileError(f"{path}: storage {key} holds {len(raw)} bytes, expected "
                                           f"{numel * dtype.itemsize} (truncated)")
                arr = np.frombuffer(raw, dtype, count=numel).astype(dtype.newbyteorder("="))
                if kind == "BFloat16Storage":  # bfloat16 = the top half of a float32
                    arr = (arr.astype(np.uint32) << 16).view(np.float32)
                return arr

            with zf.open(prefix + "data.pkl") as fh:
                return _RestrictedUnpickler(fh, path, read_storage).load()
    except WeightsFileError:
        raise
    except (zipfile.BadZipFile, EOFError, KeyError, OSError, pickle.UnpicklingError, ValueError) as e:
        raise WeightsFileError(f"{path}: truncated or damaged .pth file ({type(e).__name__}: {e})") from None


def flat_state_dict(obj: Any, path: str) -> Dict[str, np.ndarray]:
    """{name: array} of a state dict, also when it is wrapped as arcface_torch's training checkpoint
    does ({"state_dict_backbone": ...}) or saved from a DDP module (names prefixed "module.")."""
    if isinstance(obj, dict) and "state_dict_backbone" in obj:
        obj = obj["state_dict_backbone"]
    elif isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, np.ndarray) for v in obj.values()):
        raise WeightsFileError(f"{path}: expected a state dict of tensors, found {type(obj).__name__}")
    names = list(obj)
    if all(n.startswith("module.") for n in names):
        obj = {n[len("module."):]: v for n, v in obj.items()}
    return dict(obj)

