"""insightface verification `.bin` pair files (LFW, CFP-FP, AgeDB-30, ... format): read and write.

A `.bin` is a pickle of `(images, issame)`: 2P encoded images (JPEG/PNG bytes; Python 2 files
hold `str`, arcface_paddle ones uint8 arrays) and P booleans, image 2p and 2p+1 forming pair p.
"""
import io
import pickle
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
from PIL import Image

from of_face.io import atomic_write


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


def read_bin_entries(path) -> Tuple[list, np.ndarray]:
    """The raw pickle of a verification .bin: (encoded images, issame bool [P]), count-checked."""
    with open(path, "rb") as f:
        try:
            try:
                bins, issame = pickle.load(f)
            except UnicodeDecodeError:
                # Written by Python 2: its `str` image bytes only load as bytes.
                f.seek(0)
                bins, issame = pickle.load(f, encoding="bytes")
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError,
                IndexError, KeyError, MemoryError, UnicodeDecodeError) as e:
            # a cut download, an HTML error page, another format: name the file, not pickle's opcode
            cut = isinstance(e, EOFError) or "truncated" in str(e)
            what = "cut short: a partial download or copy?" if cut else f"{type(e).__name__}: {e}"
            raise ValueError(f"{path}: not a readable verification .bin ({what}); expected insightface's "
                             "pickled (images, issame); download or convert it again") from None
    issame = np.asarray(issame, dtype=np.bool_).reshape(-1)
    if len(bins) % 2 or len(bins) != 2 * len(issame):
        raise ValueError(
            f"{path}: {len(bins)} images for {len(issame)} pairs (need an even count = 2 x pairs)"
        )
    return bins, issame


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
                raise ValueError(f"{path}: image {i} does not decode ({exc})") from exc
        img = decoded[key]
        if img.shape[:2] != tuple(image_size):
            raise ValueError(f"{path}: image {i} is {img.shape[1]}x{img.shape[0]}, expected "
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
