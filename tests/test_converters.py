"""Converters of of_face.data.convert: images -> rec, rec -> images, .bin -> images."""
import io
import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, SHARED, need
from of_face.data.convert import bin2images, bin2images_main, images2rec, main, rec2images
from of_face.data.recordio import RecordDataset

mx = pytest.importorskip("mxnet")

GLINT = SHARED / "data" / "glint14"
SMALL_LFW = SHARED / "data" / "small_lfw.bin"
GLINT_COUNTS = {0: 109, 1: 200, 2: 200, 3: 200, 4: 200, 5: 200, 6: 66, 7: 200, 8: 200, 9: 22,
                10: 200, 11: 200, 12: 200, 13: 200}


def _image(seed):
    return np.random.default_rng(seed).integers(0, 256, (112, 112, 3), dtype=np.uint8)


def _read_all(rec_dir):
    """Independent reader: every record of train.rec via mxnet -> {key: (header, payload)}."""
    rec = mx.recordio.MXIndexedRecordIO(str(rec_dir / "train.idx"), str(rec_dir / "train.rec"), "r")
    out = {k: mx.recordio.unpack(rec.read_idx(k)) for k in rec.keys}
    rec.close()
    return out


def test_png_round_trip_is_lossless(tmp_path):
    src = tmp_path / "src"
    # label.txt with classes listed out of order, a gap-free 0..2 label set, and an RGBA PNG
    pixels, lines = {}, []
    for n, label in enumerate([2, 0, 1, 2, 0, 2]):
        arr = _image(n)
        rel = f"imgs/{n}.png"
        (src / "imgs").mkdir(parents=True, exist_ok=True)
        if n == 3:
            rgba = np.dstack([arr, np.full((112, 112), 255, np.uint8)])
            Image.fromarray(rgba, "RGBA").save(src / rel)
        else:
            Image.fromarray(arr).save(src / rel)
        pixels[rel] = (arr, label)
        lines.append(f"{rel}\t{label}\n")
    (src / "label.txt").write_text("".join(lines))

    out = tmp_path / "rec"
    assert images2rec(src, out, workers=1) == (6, 3)
    assert (out / "property").read_text().strip() == "3,112,112"
    assert sorted(p.name for p in out.iterdir()) == ["property", "train.idx", "train.rec"]

    # insightface layout checked with mxnet directly
    records = _read_all(out)
    assert sorted(records) == list(range(0, 1 + 6 + 3))
    header0, payload0 = records[0]
    assert header0.flag == 2 and list(header0.label) == [7.0, 10.0] and payload0 == b""
    image_labels = [int(records[k][0].label) for k in range(1, 7)]
    assert image_labels == [0, 0, 1, 2, 2, 2]  # stable sort by label
    ranges = [list(map(int, records[k][0].label)) for k in range(7, 10)]
    assert ranges == [[1, 3], [3, 4], [4, 7]]
    # PNG input -> PNG bytes unchanged in the rec
    src_bytes = sorted((src / rel).read_bytes() for rel in pixels)
    assert sorted(records[k][1] for k in range(1, 7)) == src_bytes

    ds = RecordDataset(out)
    assert len(ds) == 6 and ds.num_classes == 3
    assert ds.labels().tolist() == [0, 0, 1, 2, 2, 2]
    want = sorted((label, arr.tobytes()) for arr, label in pixels.values())
    got = sorted((label, img.tobytes()) for img, label in (ds[i] for i in range(len(ds))))
    assert got == want


def test_folder_input_and_parallel_cli(tmp_path):
    src = tmp_path / "src"
    arrays = {}
    for name, count in (("zed", 2), ("amy", 3)):
        (src / name).mkdir(parents=True)
        for j in range(count):
            arr = _image(100 * len(name) + 10 * ord(name[0]) + j)
            Image.fromarray(arr).save(src / name / f"{j}.png")
            arrays[(name, j)] = arr
    out = tmp_path / "rec"
    proc = subprocess.run([sys.executable, "-m", "of_face.data.convert", "images2rec", "--input", str(src),
                           "--output", str(out), "--workers", "2"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    ds = RecordDataset(out)
    assert ds.labels().tolist() == [0, 0, 0, 1, 1]  # amy -> 0, zed -> 1
    for i, (name, j) in enumerate([("amy", 0), ("amy", 1), ("amy", 2), ("zed", 0), ("zed", 1)]):
        np.testing.assert_array_equal(ds[i][0], arrays[(name, j)])


def _jpeg_set(root, n=4):
    (root / "p").mkdir(parents=True)
    lines, blobs = [], {}
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(_image(10 + i)).save(buf, format="JPEG", quality=80)
        (root / "p" / f"{i}.jpg").write_bytes(buf.getvalue())
        lines.append(f"p/{i}.jpg\t{i % 2}\n")
        blobs[i] = buf.getvalue()
    (root / "label.txt").write_text("".join(lines))
    return blobs


def test_keep_jpeg_bytes_survive_rec2images(tmp_path):
    blobs = _jpeg_set(tmp_path / "src")
    out = tmp_path / "rec"
    assert main(["images2rec", "--input", str(tmp_path / "src"), "--output", str(out), "--workers", "1",
                 "--keep-jpeg"]) == 0
    back = tmp_path / "back"
    assert rec2images(out, back) == 4
    lines = (back / "label.txt").read_text().splitlines()
    # sorted by label: images 0, 2 (label 0) then 1, 3 (label 1) -> record keys 1..4
    assert lines == ["images/0/1.jpg\t0", "images/0/2.jpg\t0", "images/1/3.jpg\t1", "images/1/4.jpg\t1"]
    for line, i in zip(lines, [0, 2, 1, 3]):
        assert (back / line.split("\t")[0]).read_bytes() == blobs[i]

    # without --keep-jpeg the JPEGs are re-encoded at --quality (different bytes, close pixels)
    out2 = tmp_path / "rec2"
    images2rec(tmp_path / "src", out2, quality=95, workers=1)
    records = _read_all(out2)
    assert records[1][1] != blobs[0] and records[1][1][:3] == b"\xff\xd8\xff"


def test_failure_leaves_nothing_half_written(tmp_path):
    _jpeg_set(tmp_path / "src")
    Image.fromarray(np.zeros((50, 60, 3), np.uint8)).save(tmp_path / "src" / "p" / "1.jpg")
    out = tmp_path / "rec"
    with pytest.raises(ValueError, match=r"1\.jpg: image is 60x50, expected 112x112"):
        images2rec(tmp_path / "src", out, workers=1)
    assert list(out.iterdir()) == []
    with pytest.raises(ValueError, match=r"1\.jpg: --keep-jpeg needs 112x112"):
        images2rec(tmp_path / "src", out, workers=1, keep_jpeg=True)
    assert list(out.iterdir()) == []
    with pytest.raises(ValueError, match=r"1\.jpg: image is 60x50"):  # the error crosses the process pool
        images2rec(tmp_path / "src", out, workers=2)
    assert list(out.iterdir()) == []
    # --resize packs it
    assert images2rec(tmp_path / "src", out, workers=1, resize=True) == (4, 2)
    assert RecordDataset(out)[2][0].shape == (112, 112, 3)


def test_rec2images_glint14(tmp_path):
    need(GLINT / "train.rec", GLINT / "train.idx")
    out = tmp_path / "out"
    assert main(["rec2images", "--root_dir", str(GLINT), "--output_dir", str(out)]) == 0
    files = sorted(p for p in (out / "images").rglob("*") if p.is_file())
    assert len(files) == 2397
    lines = (out / "label.txt").read_text().splitlines()
    assert len(lines) == 2397
    counts = Counter()
    rec = mx.recordio.MXIndexedRecordIO(str(GLINT / "train.idx"), str(GLINT / "train.rec"), "r")
    try:
        for line in lines:
            rel, label = line.split("\t")
            label = int(label)
            parts = Path(rel).parts
            assert parts[0] == "images" and parts[1] == str(label) and parts[2].endswith(".jpg")
            key = int(parts[2][:-4])
            header, payload = mx.recordio.unpack(rec.read_idx(key))
            assert int(header.label) == label
            assert (out / rel).read_bytes() == payload
            counts[label] += 1
    finally:
        rec.close()
    assert dict(counts) == GLINT_COUNTS
    assert {int(p.parent.name) for p in files} == set(range(14))


@pytest.mark.parametrize("flip", [False, True])
def test_bin2images_small_lfw(tmp_path, flip):
    need(SMALL_LFW)
    from of_face.data.verification_bin import load_bin

    out = tmp_path / "out"
    argv = ["bin2images", "--bin_path", str(SMALL_LFW), "--out_dir", str(out)] + (["--flip_test"] if flip else [])
    assert main(argv) == 0
    with open(SMALL_LFW, "rb") as f:
        bins, issame = pickle.load(f)
    ref_images, ref_issame = load_bin(SMALL_LFW)
    originals = sorted((out / "images").glob("*.jpg"))
    assert len(originals) == 20
    for i, path in enumerate(originals):
        assert path.name == f"{i:08d}.jpg"
        assert path.read_bytes() == np.asarray(bins[i]).tobytes()
    lines = (out / "pair_label.txt").read_text().splitlines()
    assert len(lines) == 10
    for p, line in enumerate(lines):
        a, b, same = line.split(" ")
        assert (a, b, same) == (f"images/{2 * p:08d}.jpg", f"images/{2 * p + 1:08d}.jpg", "1")
    assert ref_issame.all()
    flips = sorted((out / "images").glob("*_flip.png"))
    if not flip:
        assert flips == [] and not (out / "pair_label_flip.txt").exists()
        return
    assert len(flips) == 20
    for i, path in enumerate(flips):
        assert path.name == f"{i:08d}_flip.png"
        with Image.open(path) as im:
            np.testing.assert_array_equal(np.asarray(im.convert("RGB")), np.fliplr(ref_images[i]))
    assert (out / "pair_label_flip.txt").read_text().splitlines()[0] == \
        "images/00000000_flip.png images/00000001_flip.png 1"


def test_console_entry_point_and_api(tmp_path):
    need(SMALL_LFW)
    assert bin2images_main(["--bin_path", str(SMALL_LFW), "--out_dir", str(tmp_path / "a")]) == 0
    assert bin2images(SMALL_LFW, tmp_path / "b") == 10
    assert (tmp_path / "a" / "pair_label.txt").read_bytes() == (tmp_path / "b" / "pair_label.txt").read_bytes()
    scripts = (REPO / "pyproject.toml").read_text()
    for name in ("rec2images", "bin2images", "images2rec"):
        assert f'of-face-{name} = "of_face.data.convert:{name}_main"' in scripts


def test_glint14_round_trip_is_byte_identical(tmp_path):
    """rec2images then images2rec --keep-jpeg rebuilds the shared insightface-packed files exactly."""
    need(GLINT / "train.rec", GLINT / "train.idx", GLINT / "property")
    rec2images(GLINT, tmp_path / "imgs")
    assert images2rec(tmp_path / "imgs", tmp_path / "rec", workers=2, keep_jpeg=True) == (2397, 14)
    for name in ("train.rec", "train.idx", "property"):
        assert (tmp_path / "rec" / name).read_bytes() == (GLINT / name).read_bytes(), name
