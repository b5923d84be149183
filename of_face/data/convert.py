"""Dataset converters between insightface RecordIO / .bin files and plain image folders.

Usage (also as console scripts ``of-face-rec2images``, ``of-face-bin2images``, ``of-face-images2rec``)::

    python -m of_face.data.convert rec2images --root_dir DIR_WITH_train.rec --output_dir OUT
    python -m of_face.data.convert bin2images --bin_path X.bin --out_dir OUT [--flip_test]
    python -m of_face.data.convert images2rec --input DIR --output OUT [--quality 95] [--workers N] [--keep-jpeg]

rec2images (like PLSC's ``mx_recordio_2_images``)
    Writes ``OUT/images/<label>/<record index>.jpg`` with the record's encoded bytes unchanged (no
    re-encode; a PNG payload gets ``.png``) and ``OUT/label.txt`` with ``images/<label>/<index>.jpg<TAB><label>``.

bin2images (like PLSC's ``lfw_style_bin_dataset_converter``)
    Writes image *i* of the .bin as ``OUT/images/<i:08d>.jpg`` (the stored bytes unchanged; ``.png`` if the
    bytes are PNG) and ``OUT/pair_label.txt`` with ``images/<2p>.jpg images/<2p+1>.jpg <issame 0|1>`` per
    pair. With ``--flip_test`` it also writes the horizontal flip of every image as
    ``OUT/images/<i:08d>_flip.png`` (PNG, so lossless: it decodes to exactly ``np.fliplr`` of the original)
    and ``OUT/pair_label_flip.txt`` listing the flipped pairs in the same format.

images2rec (the insightface packer layout, readable by ``RecordDataset`` / arcface_torch's ``MXFaceDataset``)
    Input: a folder with ``label.txt`` (PLSC) or one sub-folder per identity. Output ``OUT/train.rec``,
    ``train.idx``, ``property`` ("C,112,112"): record 0 header ``[first range record, end]``, images
    1..N sorted by label (stable), one range record per class. Payloads:
      * PNG input of the right size: the PNG file bytes unchanged (lossless: pixels read back exactly);
      * ``--keep-jpeg``: JPEG files byte-for-byte (no re-encode; must be 112x112);
      * anything else: decoded to RGB (resized bilinear with ``--resize``) and JPEG-encoded at ``--quality``.
    Encoding runs in a process pool of ``--workers``. Files are written under temporary names and renamed
    at the end, so a failure leaves no half-written ``train.rec``.
"""
import argparse
import contextlib
import io
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from of_face.data import record_index
from of_face.data.verification_bin import entry_bytes, read_bin_entries
from of_face.io import atomic_path, atomic_write

SIZE = 112


def _image_ext(raw):
    """'.png' for PNG bytes, '.jpg' otherwise (the usual payload)."""
    return ".png" if raw[:8] == b"\x89PNG\r\n\x1a\n" else ".jpg"


def _is_jpeg(raw):
    return raw[:3] == b"\xff\xd8\xff"


def _atomic_write_bytes(path, data):
    with atomic_write(path) as f:
        f.write(data)


# ----- rec -> images ----------------------------------------------------------------------------
def rec2images(root_dir, output_dir):
    """Unpack a RecordIO set to images/<label>/<index>.jpg + label.txt; returns the number of images."""
    from .recordio import RecordDataset

    ds = RecordDataset(root_dir)
    out = Path(output_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for record_id in ds.ids:
        header, payload = ds._read_record(int(record_id))
        label = record_index.header_class(header, ds.rec_path, int(record_id))
        rel = f"images/{label}/{int(record_id)}{_image_ext(payload)}"
        (out / "images" / str(label)).mkdir(exist_ok=True)
        (out / rel).write_bytes(payload)
        lines.append(f"{rel}\t{label}\n")
    _atomic_write_bytes(out / "label.txt", "".join(lines).encode())
    return len(lines)


# ----- .bin -> images ---------------------------------------------------------------------------
def bin2images(bin_path, out_dir, flip_test=False):
    """Unpack a verification .bin to images + pair_label.txt; returns the number of pairs."""
    bins, issame = read_bin_entries(bin_path)
    issame = [bool(x) for x in issame]
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    names, flip_names = [], []
    for i, entry in enumerate(bins):
        raw = entry_bytes(entry)
        rel = f"images/{i:08d}{_image_ext(raw)}"
        (out / rel).write_bytes(raw)
        names.append(rel)
        if flip_test:
            try:
                with Image.open(io.BytesIO(raw)) as im:
                    flipped = im.convert("RGB").transpose(Image.FLIP_LEFT_RIGHT)
            except (OSError, SyntaxError) as err:
                raise ValueError(f"{bin_path}: image {i} does not decode ({err})") from None
            frel = f"images/{i:08d}_flip.png"
            flipped.save(out / frel, format="PNG")
            flip_names.append(frel)

    def pair_lines(n):
        return "".join(f"{n[2 * p]} {n[2 * p + 1]} {int(s)}\n" for p, s in enumerate(issame))

    _atomic_write_bytes(out / "pair_label.txt", pair_lines(names).encode())
    if flip_test:
        _atomic_write_bytes(out / "pair_label_flip.txt", pair_lines(flip_names).encode())
    return len(issame)


# ----- images -> rec ----------------------------------------------------------------------------
def _encode_one(job):
    """(path, quality, keep_jpeg, resize) -> encoded payload bytes (runs in a worker process)."""
    path, quality, keep_jpeg, resize = job
    raw = Path(path).read_bytes()
    try:
        with Image.open(io.BytesIO(raw)) as im:
            size, fmt = im.size, im.format
            if (keep_jpeg and fmt == "JPEG") or (fmt == "PNG" and im.mode in ("RGB", "L", "P", "RGBA")):
                if size == (SIZE, SIZE):
                    return raw
                if keep_jpeg and fmt == "JPEG":
                    raise ValueError(f"{path}: --keep-jpeg needs {SIZE}x{SIZE} images, got {size[0]}x{size[1]}")
            img = im.convert("RGB")
    except (OSError, SyntaxError) as err:
        raise ValueError(f"{path}: could not be decoded as an image ({type(err).__name__}: {err})") from None
    if img.size != (SIZE, SIZE):
        if not resize:
            raise ValueError(f"{path}: image is {img.size[0]}x{img.size[1]}, expected {SIZE}x{SIZE} "
                             f"(use --resize)")
        img = img.resize((SIZE, SIZE), Image.BILINEAR)
    buf = io.BytesIO()
    if fmt == "PNG":
        img.save(buf, format="PNG")  # stay lossless for PNG input
    else:
        img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def images2rec(input_dir, output_dir, quality=95, workers=1, keep_jpeg=False, resize=False):
    """Pack an image folder (label.txt or folder-per-identity) into train.rec/.idx/property."""
    import mxnet as mx
    from .folder import open_image_dataset

    ds = open_image_dataset(input_dir, resize=resize)
    # RecordIO labels are float32: ids above 2**24 would merge. Refused before anything is written.
    record_index.check_class_count(ds.num_classes, input_dir)
    labels = ds.labels()
    order = np.argsort(labels, kind="stable")  # classes must be contiguous for the range records
    jobs = [(str(ds.paths[i]), quality, keep_jpeg, resize) for i in order]
    n, num_classes = len(jobs), ds.num_classes
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # one temporary per file (io.atomic_path), renamed into place only when all are complete
    with contextlib.ExitStack() as stack:
        tmp_prop, tmp_idx, tmp_rec = (stack.enter_context(atomic_path(out / name))
                                      for name in ("property", "train.idx", "train.rec"))
        writer = mx.recordio.MXIndexedRecordIO(tmp_idx, tmp_rec, "w")
        first_range = n + 1
        writer.write_idx(0, mx.recordio.pack(
            mx.recordio.IRHeader(0, [float(first_range), float(first_range + num_classes)], 0, 0), b""))
        if workers > 1:
            pool = ProcessPoolExecutor(max_workers=workers)
            payloads = pool.map(_encode_one, jobs, chunksize=max(1, min(64, n // (4 * workers) or 1)))
        else:
            pool, payloads = None, map(_encode_one, jobs)
        try:
            for key, (payload, i) in enumerate(zip(payloads, order), 1):
                writer.write_idx(key, mx.recordio.pack(
                    mx.recordio.IRHeader(0, float(labels[i]), key, 0), payload))
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
        sorted_labels = labels[order]
        for c in range(num_classes):
            lo = int(np.searchsorted(sorted_labels, c, "left")) + 1
            hi = int(np.searchsorted(sorted_labels, c, "right")) + 1
            key = first_range + c
            writer.write_idx(key, mx.recordio.pack(mx.recordio.IRHeader(0, [float(lo), float(hi)], key, 0), b""))
        writer.close()
        Path(tmp_prop).write_text(f"{num_classes},{SIZE},{SIZE}\n")
    return n, num_classes


# ----- command line -----------------------------------------------------------------------------
def _add_rec2images(p):
    p.add_argument("--root_dir", required=True, help="folder with train.rec/train.idx (or a .rec path)")
    p.add_argument("--output_dir", required=True)


def _add_bin2images(p):
    p.add_argument("--bin_path", required=True)
    p.add_argument("--out_dir", required=True)
    p.add_argument("--flip_test", action="store_true", help="also write flipped copies (<i>_flip.png)")


def _add_images2rec(p):
    p.add_argument("--input", required=True, help="folder with label.txt or one sub-folder per identity")
    p.add_argument("--output", required=True)
    p.add_argument("--quality", type=int, default=95, help="JPEG quality for re-encoded images")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)))
    p.add_argument("--keep-jpeg", dest="keep_jpeg", action="store_true", help="pack JPEG files byte-for-byte")
    p.add_argument("--resize", action="store_true", help="resize non-112x112 images (bilinear)")


def _run(cmd, args):
    try:
        return _convert(cmd, args)
    except (ValueError, FileNotFoundError) as e:  # bad input, named by the reader: one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        return 2


def _convert(cmd, args):
    if cmd == "rec2images":
        n = rec2images(args.root_dir, args.output_dir)
        print(f"{args.output_dir}: {n} images + label.txt")
    elif cmd == "bin2images":
        n = bin2images(args.bin_path, args.out_dir, args.flip_test)
        print(f"{args.out_dir}: {2 * n} images, {n} pairs in pair_label.txt")
    else:
        n, c = images2rec(args.input, args.output, args.quality, args.workers, args.keep_jpeg, args.resize)
        print(f"{args.output}: {n} images of {c} classes in train.rec")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m of_face.data.convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, add in (("rec2images", _add_rec2images), ("bin2images", _add_bin2images),
                      ("images2rec", _add_images2rec)):
        add(sub.add_parser(name))
    args = parser.parse_args(argv)
    return _run(args.cmd, args)


def _single(cmd, add):
    def entry(argv=None):
        parser = argparse.ArgumentParser(prog=f"of-face-{cmd}")
        add(parser)
        return _run(cmd, parser.parse_args(argv))
    return entry


rec2images_main = _single("rec2images", _add_rec2images)
bin2images_main = _single("bin2images", _add_bin2images)
images2rec_main = _single("images2rec", _add_images2rec)

if __name__ == "__main__":
    sys.exit(main())
