"""insightface verification `.bin` pair files (LFW, CFP-FP, AgeDB-30, ... format): read and write.

A `.bin` is a pickle of `(images, issame)`: 2P encoded images (JPEG/PNG bytes; Python 2 files
hold `str`, insightface's cv2.imencode and arcface_paddle ones uint8 arrays) and P booleans,
image 2p and 2p+1 forming pair p.

Users download these files from anywhere, and `pickle.load` runs whatever callable a pickle names
(`os.system`, ...). So the reader resolves only the globals such a file needs to local checked
stand-ins (numpy array and dtype reconstruction for uint8/bool arrays, numpy bool scalars,
`_codecs.encode` of latin-1 text, which protocol 2 uses for `bytes`) and refuses any other before
it is called, naming the file and the global; the content is then checked to be 2 x P images
and P labels.
"""
import codecs
import io
import pickle
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
from PIL import Image

from of_face.io import atomic_write

# dtypes a verification set's arrays may have: encoded bytes (uint8/int8) and labels (bool)
_DTYPES = {np.dtype(np.uint8), np.dtype(np.int8), np.dtype(np.bool_)}
_EXPECTED = "expected insightface's pickled (images, issame)"


class BinFileError(ValueError):
    """A verification .bin is refused (unsafe, unreadable or of the wrong shape); names the file."""


class _Refused(pickle.UnpicklingError):
    """Raised inside the unpickler; turned into one BinFileError naming the file."""


def _dtype(name, align=False, copy=True):
    # a copy, never numpy's shared instance: the pickle's BUILD then sets its state on this one
    dt = np.dtype(name.decode("latin1") if isinstance(name, bytes) else name, bool(align), True)
    if dt not in _DTYPES:
        raise _Refused(f"an array of dtype {dt} (only uint8 image bytes and bool labels are read)")
    return dt


def _reconstruct(subtype, shape, dtype_code):
    if subtype is not np.ndarray:
        raise _Refused(f"an array of type {getattr(subtype, '__name__', subtype)!r}")
    return np.ndarray.__new__(np.ndarray, shape, _dtype(dtype_code))


def _scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype != np.dtype(np.bool_) or not isinstance(data, bytes):
        raise _Refused(f"a numpy scalar of dtype {dtype} (only bool labels are read)")
    return np.frombuffer(data, np.bool_)[0]


def _encode(text, encoding="utf-8"):
    if not isinstance(text, str) or codecs.lookup(encoding).name != "iso8859-1":
        raise _Refused(f"_codecs.encode with {encoding!r} (only latin-1 text to bytes is read)")
    return text.encode("latin1")


# the only globals a verification .bin may name -> what they resolve to here
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # written by numpy >= 2
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _encode,
}


class _BinUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise BinFileError(
                f"{self.path}: refusing pickle global '{module}.{name}' (a verification .bin holds only image bytes "
                f"and bool labels; pickle.load would call it): not a verification set, do not load it") from None

    def persistent_load(self, pid):
        raise BinFileError(f"{self.path}: refusing a pickle persistent id (not a verification .bin)")


def _unpickle(path, f, encoding):
    u = _BinUnpickler(f, encoding=encoding)
    u.path = path
    return u.load()


def entry_bytes(entry) -> bytes:
    """The encoded image bytes of one .bin entry (bytes, bytearray, py2 str or numpy uint8 array)."""
    if isinstance(entry, np.ndarray):
        return entry.tobytes()  # e.g. arcface_paddle files store uint8 arrays of shape (n, 1)
    if isinstance(entry, str):
        return entry.encode("latin1")  # a py2 str unpickled as text
    return bytes(entry)


def _decode(entry):
    """JPEG/PNG bytes of one entry -> RGB uint8 array."""
    with Image.open(io.BytesIO(entry_bytes(entry))) as img:
        return np.asarray(img.convert("RGB"))


def _check_entries(path, obj) -> Tuple[list, np.ndarray]:
    """(images, issame) of an unpickled .bin, or one BinFileError naming the file and what is wrong."""
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        what = f"an object of type {type(obj).__name__}"
        what += f" of {len(obj)} items" if isinstance(obj, (tuple, list)) else ""
        raise BinFileError(f"{path}: holds {what}; {_EXPECTED}: 2 x P encoded images and P bool labels")
    bins, issame = obj
    if not isinstance(bins, (list, tuple)):
        raise BinFileError(f"{path}: the images are of type {type(bins).__name__}; {_EXPECTED}: a list of 2 x P "
                           "encoded images")
    for i, entry in enumerate(bins):
        if not (isinstance(entry, (bytes, bytearray, str))
                or (isinstance(entry, np.ndarray) and entry.dtype in (np.uint8, np.int8))):
            raise BinFileError(f"{path}: image {i} is of type {type(entry).__name__}, expected encoded image bytes")
    if isinstance(issame, np.ndarray):
        if issame.dtype != np.bool_:
            raise BinFileError(f"{path}: the labels are an array of {issame.dtype}, expected bool")
    elif isinstance(issame, (list, tuple)):
        bad = next((i for i, s in enumerate(issame) if not isinstance(s, (bool, np.bool_))
                    and not (type(s) is int and s in (0, 1))), None)
        if bad is not None:
            raise BinFileError(f"{path}: label {bad} is {issame[bad]!r} (of type {type(issame[bad]).__name__}), "
                               "expected True/False")
    else:
        raise BinFileError(f"{path}: the labels are of type {type(issame).__name__}; {_EXPECTED}: a list of P bools")
    issame = np.asarray(issame, dtype=np.bool_).reshape(-1)
    if len(issame) == 0 or len(bins) != 2 * len(issame):
        raise BinFileError(f"{path}: {len(bins)} images for {len(issame)} pairs; expected 2 x pairs images "
                           "(image 2p and 2p+1 form pair p) and at least one pair")
    return list(bins), issame


def read_bin_entries(path) -> Tuple[list, np.ndarray]:
    """The content of a verification .bin: (encoded images, issame bool [P]), read without running
    any of the pickle's code and shape-checked; a BinFileError (a ValueError) names the file."""
    with open(path, "rb") as f:
        try:
            try:
                obj = _unpickle(path, f, "ASCII")
            except UnicodeDecodeError:
                # Written by Python 2: its `str` image bytes only load as bytes.
                f.seek(0)
                obj = _unpickle(path, f, "bytes")
        except BinFileError:
            raise
        except _Refused as e:
            raise BinFileError(f"{path}: refusing {e}: not a verification .bin") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError,
                IndexError, KeyError, MemoryError, UnicodeDecodeError, RecursionError) as e:
            # a cut download, an HTML error page, another format: name the file, not pickle's opcode
            cut = isinstance(e, EOFError) or "truncated" in str(e)
            what = "cut short: a partial download or copy?" if cut else f"{type(e).__name__}: {e}"
            raise BinFileError(f"{path}: not a readable verification .bin ({what}); {_EXPECTED}; "
                               "download or convert it again") from None
    return _check_entries(path, obj)


def load_bin(path, image_size=(112, 112)) -> Tuple[np.ndarray, np.ndarray]:
    """Read a verification .bin: returns (images uint8 [2P, H, W, 3] RGB, issame bool [P])."""
    path = Path(path)
    bins, issame = read_bin_entries(path)
    images = np.empty((len(bins), image_size[0], image_size[1], 3), dtype=np.uint8)
    decoded = {}  # repeated images are often one shared object in the pickle: decode once
    for i, entry in enumerate(bins):
        key = id(entry)
        if key not in decoded:
            try:
                decoded[key] = _decode(entry)
            except Exception as exc:
                raise BinFileError(f"{path}: image {i} does not decode ({exc})") from None
        img = decoded[key]
        if img.shape[:2] != tuple(image_size):
            raise BinFileError(f"{path}: image {i} is {img.shape[1]}x{img.shape[0]}, expected "
                             f"{image_size[1]}x{image_size[0]}")
        images[i] = img
    return images, issame


def write_bin(path, images: List[bytes], issame: Sequence[bool], protocol: int = 4) -> None:
    """Write a .bin (encoded images, issame list) atomically; 2 images per pair."""
    issame = [bool(s) for s in issame]
    if len(images) != 2 * len(issame):
        raise ValueError(f"{path}: {len(images)} images for {len(issame)} pairs (need 2 x pairs)")
    with atomic_write(path) as f:
        pickle.dump((list(images), issame), f, protocol=protocol)
