"""Read face images from plain image folders (the same interface as ``RecordDataset``).

Two layouts:

* ``LabelTxtDataset(root)``: PLSC-style ``root/label.txt``, one ``relative/path<TAB>label`` line per image
  (a single space also works as the separator; blank lines are skipped). Paths are relative to ``root``.
* ``FolderDataset(root)``: one sub-folder per identity; sorted folder names get labels ``0 .. C-1`` and
  every image file (``.jpg .jpeg .png .bmp .webp``, sorted by name) in a folder is one sample.

``dataset[i]`` returns ``(uint8 HxWx3 RGB array, int label)``. Images must be 112x112 unless
``resize=True`` (then PIL bilinear resize to ``image_size``). Listing problems (missing file, bad label,
empty folder) raise ``ValueError``/``FileNotFoundError`` at construction, naming the file and line; a
wrong image size raises ``ValueError`` naming the image when it is read.
"""
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MAX_LABEL = 2 ** 63 - 1  # labels are int64 (any id exact); the class count, max + 1, must fit too


def load_image(path, image_size=(112, 112), resize=False):
    """Decode `path` to an RGB uint8 array of `image_size` (H, W); error or bilinear resize otherwise."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (image_size[1], image_size[0]):
                if not resize:
                    raise ValueError(f"{path}: image is {im.size[0]}x{im.size[1]}, expected "
                                     f"{image_size[1]}x{image_size[0]} (set Data.resize=true to resize)")
                im = im.resize((image_size[1], image_size[0]), Image.BILINEAR)
            return np.asarray(im)
    except (OSError, SyntaxError) as err:  # PIL's UnidentifiedImageError is an OSError
        raise ValueError(f"{path}: could not be decoded as an image ({type(err).__name__}: {err})") from None


class _ImageListDataset:
    """Shared part: `self.paths` (list of Path) and `self._labels` (int64) set by subclasses."""

    image_size = (112, 112)

    def __init__(self, root, resize=False):
        self.root = Path(root)
        self.resize = resize
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        self.paths, labels = self._scan()
        if not self.paths:
            raise ValueError(f"{self.root}: no images found")
        self._labels = np.asarray(labels, dtype=np.int64)
        self.num_classes = int(self._labels.max()) + 1
        self.image_shape = (self.image_size[0], self.image_size[1], 3)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        return load_image(self.paths[index], self.image_size, self.resize), int(self._labels[index])

    def labels(self):
        """Class label of every image (int64, dataset order)."""
        return self._labels.copy()

    def samples(self):
        """List of (path, label) pairs in dataset order."""
        return [(p, int(l)) for p, l in zip(self.paths, self._labels)]

    def __repr__(self):
        return f"{type(self).__name__}({str(self.root)!r}, images={len(self)}, classes={self.num_classes})"


class LabelTxtDataset(_ImageListDataset):
    """PLSC-style ``label.txt`` (``relative/path<TAB>label`` lines) next to the images."""

    def __init__(self, root, resize=False, label_file="label.txt"):
        self.label_file = label_file
        super().__init__(root, resize)

    def _scan(self):
        listing = self.root / self.label_file
        if not listing.is_file():
            raise FileNotFoundError(f"label file not found: {listing}")
        paths, labels = [], []
        with open(listing, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                parts = line.split("\t") if "\t" in line else line.rsplit(" ", 1)
                if len(parts) != 2 or not parts[0].strip():
                    raise ValueError(f"{listing}: line {line_no} is not 'path<TAB>label': {line!r}")
                rel, label_text = parts[0].strip(), parts[1].strip()
                try:
                    label = int(label_text)
                except ValueError:
                    raise ValueError(f"{listing}: line {line_no}: label {label_text!r} is not an integer") from None
                if label < 0:
                    raise ValueError(f"{listing}: line {line_no}: label {label} is negative")
                if label >= MAX_LABEL:
                    raise ValueError(f"{listing}: line {line_no}: label {label}, expected a class id below "
                                     f"{MAX_LABEL} (2**63 - 1: labels are int64)")
                path = self.root / rel
                if not path.is_file():
                    raise FileNotFoundError(f"{listing}: line {line_no}: image file not found: {path}")
                paths.append(path)
                labels.append(label)
        if not paths:
            raise ValueError(f"{listing}: lists no images")
        return paths, labels


class FolderDataset(_ImageListDataset):
    """One sub-folder per identity; sorted folder names -> labels 0..C-1."""

    def _scan(self):
        folders = sorted(p for p in self.root.iterdir() if p.is_dir())
        if not folders:
            raise ValueError(f"{self.root}: no identity sub-folders found")
        self.class_names = [p.name for p in folders]
        paths, labels = [], []
        for label, folder in enumerate(folders):
            files = sorted(p for p in folder.iterdir()
                           if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                raise ValueError(f"{folder}: identity folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            paths.extend(files)
            labels.extend([label] * len(files))
        return paths, labels


def open_image_dataset(root, resize=False):
    """`LabelTxtDataset` when `root/label.txt` exists, else `FolderDataset`."""
    root = Path(root)
    if (root / "label.txt").is_file():
        return LabelTxtDataset(root, resize=resize)
    return FolderDataset(root, resize=resize)
