"""Class ids above 2**24 (which float32 merges: 2**24 + 1 reads back as 2**24) from the data
sources to the labels tensor: exact (int64) where the format holds them (label.txt folders, the
loader, the labels tensor, the trainer's class count), refused with one line naming the file where
the format stores float32 (RecordIO headers, the synthetic set, the images -> rec converter)."""
import numpy as np
import pytest
from PIL import Image

from conftest import REPO, tiny, train_cmd
from of_face.config import ConfigError, load_config
from of_face.data import record_index, synthetic
from of_face.data.convert import images2rec
from of_face.data.convert import main as convert_main
from of_face.data.folder import LabelTxtDataset
from of_face.data.loader import ShardedLoader
from of_face.data.recordio import RecordDataset

mx = pytest.importorskip("mxnet")
BIG = 2 ** 24
assert np.float32(BIG + 1) == np.float32(BIG) and np.float32(BIG + 3) == np.float32(BIG + 4)  # what merges


def _label_txt_set(root, labels):
    root.mkdir()
    for i in range(len(labels)):
        Image.fromarray(np.full((112, 112, 3), i, np.uint8)).save(root / f"{i}.png")
    (root / "label.txt").write_text("".join(f"{i}.png\t{c}\n" for i, c in enumerate(labels)))
    return root


def _write_rec(folder, labels, ranges=None, num_classes=None):
    """A .rec/.idx written by mxnet: images 8x8-byte stand-ins with scalar float32 labels; with
    `ranges`, insightface's header record 0 and identity-range records; `num_classes` a property."""
    folder.mkdir()
    w = mx.recordio.MXIndexedRecordIO(str(folder / "train.idx"), str(folder / "train.rec"), "w")
    n, first = len(labels), 1 if ranges is not None else 0
    if ranges is not None:
        w.write_idx(0, mx.recordio.pack(mx.recordio.IRHeader(0, [n + 1, n + 1 + len(ranges)], 0, 0), b""))
    for i, c in enumerate(labels):
        w.write_idx(i + first, mx.recordio.pack(mx.recordio.IRHeader(0, float(c), i + first, 0), b"img"))
    for k, (lo, hi) in enumerate(ranges or []):
        w.write_idx(n + 1 + k, mx.recordio.pack(mx.recordio.IRHeader(0, [lo, hi], n + 1 + k, 0), b""))
    w.close()
    if num_classes is not None:
        (folder / "property").write_text(f"{num_classes},112,112\n")
    return folder


LABELS = [BIG + 3, 0, BIG + 1, 7]  # 2**24+1 and 2**24+3: float32 would read 2**24 and 2**24+4


def test_label_txt_loader_and_labels_tensor_keep_ids_above_2_24(tmp_path):
    from of_face import parallel

    ds = LabelTxtDataset(_label_txt_set(tmp_path / "set", LABELS))
    assert ds.labels().dtype == np.int64 and ds.labels().tolist() == LABELS
    assert ds.num_classes == BIG + 4 and [ds[i][1] for i in range(4)] == LABELS
    loader = ShardedLoader(ds, 2, 0, 1, shuffle=False, flip=False)
    batches = [labels for _, labels in loader]
    assert [b.dtype for b in batches] == [np.int64] * 2
    assert np.concatenate(batches).tolist() == LABELS
    tensor = parallel.batch(batches[0], device="cpu")  # what the trainer hands the step
    assert str(tensor.dtype) == "oneflow.int64" and parallel.to_numpy(tensor).tolist() == LABELS[:2]


def test_trainer_takes_the_class_count_of_a_label_txt_set_above_2_24(tmp_path):
    from of_face.train.trainer import prepare_data

    root = _label_txt_set(tmp_path / "set", LABELS)
    cfg = load_config(REPO / "configs/default.yaml", ["Data.dataset=folder", f"Data.root={root}"])
    dataset, num_classes = prepare_data(cfg)
    assert num_classes == BIG + 4 and dataset.labels().tolist() == LABELS


def test_label_txt_refuses_a_label_int64_cannot_hold(tmp_path):
    root = _label_txt_set(tmp_path / "set", [0])
    (root / "label.txt").write_text(f"0.png\t{2 ** 63}\n")
    with pytest.raises(ValueError, match=r"label\.txt: line 1: label 9223372036854775808, expected a class id "
                                         r"below 9223372036854775807"):
        LabelTxtDataset(root)


def test_recordio_up_to_2_24_classes_is_exact(tmp_path):
    labels = [BIG - 1, 0, BIG - 2, 1]  # the largest ids float32 holds exactly
    ds = RecordDataset(_write_rec(tmp_path / "plain", labels))
    assert ds.labels().tolist() == labels and ds.num_classes == BIG
    cache = np.load(record_index.cache_path(ds.rec_path))
    assert cache["labels"].dtype == np.int64 and cache["labels"].tolist() == labels


@pytest.mark.parametrize("ranges", [None, [(1, 2), (2, 3), (3, 4), (4, 5)]])
def test_recordio_labels_float32_merged_are_refused(tmp_path, ranges):
    """Header labels 2**24+1 / 2**24+3 are stored by mxnet as 2**24 / 2**24+4: refused, naming the
    record, both for a headerless set and for insightface's layout (whose ranges count classes)."""
    root = _write_rec(tmp_path / "set", LABELS, ranges)
    first = 1 if ranges else 0  # its label 2**24 + 3 reads back as 2**24 + 4
    message = rf"set/train\.rec: record {first} has label 16777220, expected a class id below 16,777,216 \(2\*\*24\)"
    with pytest.raises(ValueError, match=message):
        RecordDataset(root).labels()
    assert not list(root.glob("*.of_face_index.npz"))  # nothing cached


def test_recordio_image_read_refuses_a_merged_label(tmp_path):
    ds = RecordDataset(_write_rec(tmp_path / "set", [BIG + 1, 0], num_classes=2))  # property: no label pass
    with pytest.raises(ValueError, match=r"train\.rec: record 0 has label 16777216, expected a class id below"):
        ds[0]


def test_recordio_property_with_more_classes_than_float32_names_is_refused(tmp_path):
    from of_face.train.trainer import prepare_data

    root = _write_rec(tmp_path / "set", [0, 1], num_classes=BIG + 1)
    with pytest.raises(ValueError, match=r"set/property: 16,777,217 classes, expected at most 16,777,216 \(2\*\*24\): "
                                         r"RecordIO stores labels as float32"):
        RecordDataset(root)
    cfg = load_config(REPO / "configs/default.yaml", ["Data.dataset=rec", f"Data.root={root}"])
    with pytest.raises(ConfigError, match=r"^Data\.root: .*set/property: 16,777,217 classes, expected at most"):
        prepare_data(cfg)


def test_label_index_cache_is_int64_and_checked(tmp_path):
    """A cache with float32 labels (not this version's) is rebuilt from the file; one that names
    ids above 2**24 (a cache written before they were refused) is refused like the file."""
    root = _write_rec(tmp_path / "set", [5, 2, 9])
    rec, idx = root / "train.rec", root / "train.idx"
    index = record_index.load_or_build(rec, idx)
    assert index["labels"].dtype == np.int64
    cache = record_index.cache_path(rec)

    def write_cache(labels):
        np.savez(cache, version=record_index.CACHE_VERSION, stamp=record_index._stamp(rec, idx),
                 **dict(index, labels=labels))
    write_cache(np.array([5, 2, 9], np.float32))
    again = record_index.load_or_build(rec, idx)
    assert again["labels"].dtype == np.int64 and again["labels"].tolist() == [5, 2, 9]
    assert np.load(cache)["labels"].dtype == np.int64  # rewritten
    write_cache(np.array([BIG + 1, 2, BIG + 3], np.int64))
    with pytest.raises(ValueError, match=r"train\.rec: 16,777,220 classes, expected at most 16,777,216"):
        record_index.load_or_build(rec, idx)


def test_recordio_non_integral_label_is_refused(tmp_path):
    root = _write_rec(tmp_path / "set", [0, 2.5])
    with pytest.raises(ValueError, match=r"train\.rec: record 1 has label 2\.5, expected a whole class id"):
        RecordDataset(root).labels()


def test_images2rec_refuses_more_classes_than_float32_names(tmp_path, capsys):
    src = _label_txt_set(tmp_path / "src", [0, BIG])  # 2**24 + 1 classes
    with pytest.raises(ValueError, match=r"src: 16,777,217 classes, expected at most 16,777,216 \(2\*\*24\)"):
        images2rec(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing written
    assert convert_main(["images2rec", "--input", str(src), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {src}: 16,777,217 classes, expected at most"), err


def test_synthetic_set_refuses_more_identities_than_float32_names(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"num_identities: 16,777,217 classes, expected at most 16,777,216"):
        synthetic.generate(tmp_path / "synth", num_identities=BIG + 1)
    assert not (tmp_path / "synth").exists()
    assert synthetic.main(["--out", str(tmp_path / "synth"), "--identities", str(BIG + 1)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: num_identities: 16,777,217 classes, expected at most 16,777,216 (2**24): RecordIO "
                   "stores labels as float32, which cannot tell ids above 2**24 apart (2**24 + 1 reads as 2**24); "
                   "a set of more classes needs int64 labels: keep it as image folders with a label.txt "
                   "(Data.dataset=folder)"]
    assert not (tmp_path / "synth").exists()
    with pytest.raises(ConfigError, match=r"Data\.synth_identities: expected at most 16,777,216 \(2\*\*24"):
        load_config(REPO / "configs/default.yaml", [f"Data.synth_identities={BIG + 1}"])


def _toy_float(v, exact=8):
    """The integer a float with float32's rounding, scaled down so that integers stop being exact
    past `exact` instead of 2**24, reads back as: what a RecordIO header holds for a record id past
    2**24 (Glint360K: 17M images), at a size a test can write. Half to even, as float32."""
    if v <= exact:
        return v
    step = 1 << (v.bit_length() - exact.bit_length() + 1)
    return round(v / step) * step


def test_float32_rounding_bound_of_record_ids():
    """record_index._slack bounds how far float32 moves an integer (checked against numpy), and the
    toy float above rounds like float32 does at 2**24 (2**24 + 1 -> 2**24, + 3 -> + 4)."""
    rng = np.random.default_rng(0)
    for v in np.concatenate([rng.integers(BIG - 100, 2 ** 27, 20000), np.arange(BIG - 3, BIG + 9)]):
        stored = int(np.float32(v))
        assert abs(stored - int(v)) <= record_index._slack(stored)
    assert [record_index._slack(v) for v in (BIG - 1, BIG, BIG + 2, 2 ** 25, 2 ** 26)] == [0, 1, 1, 2, 4]
    assert [_toy_float(v, exact=BIG) for v in (BIG + 1, BIG + 3, BIG + 5)] == [int(np.float32(v)) for v in
                                                                               (BIG + 1, BIG + 3, BIG + 5)]


def test_identity_ranges_past_the_exact_record_ids_give_each_image_its_own_label(tmp_path, monkeypatch):
    """insightface's header [a, b] and range records hold record ids as float32: past 2**24 they are
    rounded, so ranges move class boundaries by a record and `a` may name a range record as the last
    image. With the float scaled down (exact up to 8, _toy_float) every image keeps its own label."""
    sizes = [3, 5, 4, 6, 2, 7, 3]  # boundaries 1, 4, 9, 13, 19, 21, 28, 31: most are rounded
    truth = np.repeat(np.arange(len(sizes)), sizes).tolist()
    bounds = np.concatenate([[1], 1 + np.cumsum(sizes)]).tolist()
    n = len(truth)
    root = tmp_path / "set"
    root.mkdir()
    w = mx.recordio.MXIndexedRecordIO(str(root / "train.idx"), str(root / "train.rec"), "w")
    w.write_idx(0, mx.recordio.pack(mx.recordio.IRHeader(0, [_toy_float(n + 1), _toy_float(n + 1 + len(sizes))],
                                                         0, 0), b""))
    for i, c in enumerate(truth, 1):
        w.write_idx(i, mx.recordio.pack(mx.recordio.IRHeader(0, float(c), i, 0), b"img"))
    for c in range(len(sizes)):
        span = [_toy_float(bounds[c]), _toy_float(bounds[c + 1])]
        w.write_idx(n + 1 + c, mx.recordio.pack(mx.recordio.IRHeader(0, span, n + 1 + c, 0), b""))
    w.close()
    assert _toy_float(n + 1) == 32 and _toy_float(9) == 8 and _toy_float(19) == _toy_float(21) == 20  # rounded
    monkeypatch.setattr(record_index, "FLOAT32_EXACT", 8)
    from_ranges = []  # the labels come from the ranges, not from the fallback pass over every header
    real = record_index._labels_from_ranges
    monkeypatch.setattr(record_index, "_labels_from_ranges", lambda *a: from_ranges.append(real(*a)) or from_ranges[-1])
    ds = RecordDataset(root)
    assert len(from_ranges) == 1 and from_ranges[0] is not None and from_ranges[0].tolist() == truth
    assert len(ds) == n and ds.labels().tolist() == truth and ds.num_classes == len(sizes)
    assert ds.ids.tolist() == list(range(1, n + 1))  # the images, not the first range record


def test_a_merged_recordio_label_stops_every_rank_with_one_line(tmp_path, synthetic_faces):
    """Through the real launcher on 2 ranks: an image whose float32 header label is 2**24 (maybe
    2**24 + 1 rounded) ends the run before the first step, exit code 2, one line naming the record."""
    import shutil
    import struct
    import subprocess

    data = shutil.copytree(synthetic_faces(12, 4), tmp_path / "faces")
    ds = RecordDataset(data)
    with open(ds.rec_path, "r+b") as f:  # record 1's IRHeader label (after magic, length and flag)
        f.seek(int(ds._offsets[1]) + 8 + 4)
        f.write(struct.pack("<f", BIG + 1))
    for cache in data.glob("*.of_face_index.npz"):
        cache.unlink()
    out = tmp_path / "run"
    cmd = train_cmd(tiny(data, out, "Data.batch_size=4", "Global.max_steps=2", "Global.log_interval=1"), 2,
                    launcher="of_face")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text[-4000:]
    errors = [line for line in text.splitlines() if "error" in line.lower()]
    assert errors == [f"error: Data.root: {data / 'train.rec'}: record 1 has label 16777216, expected a class id "
                      "below 16,777,216 (2**24): RecordIO stores labels as float32, which cannot tell larger ids "
                      "apart; a set of more classes needs int64 labels: keep it as image folders with a label.txt "
                      "(Data.dataset=folder)"], text[-4000:]
    assert "Traceback" not in text and "step 1/" not in proc.stdout
    assert not out.exists() or not [p for p in out.rglob("*") if p.name.startswith("ckpt-") or ".tmp" in p.name]
