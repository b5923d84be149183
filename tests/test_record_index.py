"""The RecordIO label index: labels from insightface's identity ranges, else one pass
over the headers, cached beside the data (or in the cache folder when the data is read-only),
rebuilt when a file changes, built by one rank only. Labels are checked against mxnet's own
reader of every record."""
import json
import os
import shutil
import stat

import mxnet as mx
import numpy as np
import pytest

from conftest import launch
from of_face.data import record_index
from of_face.data.recordio import RecordDataset


def mxnet_labels(folder, ids):
    reader = mx.recordio.MXIndexedRecordIO(str(folder / "train.idx"), str(folder / "train.rec"), "r")
    out = []
    for i in ids:
        label = mx.recordio.unpack(reader.read_idx(int(i)))[0].label
        out.append(int(label[0]) if np.ndim(label) else int(label))
    reader.close()
    return out


@pytest.fixture
def faces(tmp_path, synthetic_faces):
    return shutil.copytree(synthetic_faces(9, 5), tmp_path / "faces")  # a copy: the tests write beside it


def test_labels_from_identity_ranges_cached_and_rebuilt(faces, monkeypatch):
    reads = []
    real_read_label = record_index.read_label
    monkeypatch.setattr(record_index, "read_label", lambda *a: reads.append(a[3]) or real_read_label(*a))
    ds = RecordDataset(faces)
    labels = ds.labels()
    assert labels.tolist() == mxnet_labels(faces, range(1, 46)) == [i // 5 for i in range(45)]
    assert len(reads) < 45 and ds.num_classes == 9  # ranges + a sample of headers, not every image
    assert ds._offsets.dtype == np.int64 and isinstance(ds._keys, np.ndarray)  # no dict of records
    cache = faces / "train.of_face_index.npz"
    assert cache.is_file()

    def no_build(*a):
        raise AssertionError("index rebuilt although the cache matches")
    monkeypatch.setattr(record_index, "build", no_build)
    again = RecordDataset(faces)
    assert again.labels().tolist() == labels.tolist() and again[7][1] == 1

    monkeypatch.undo()
    st = os.stat(faces / "train.rec")
    os.utime(faces / "train.rec", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the data changed
    built = []
    real_build = record_index.build
    monkeypatch.setattr(record_index, "build", lambda *a: built.append(a) or real_build(*a))
    assert RecordDataset(faces).labels().tolist() == labels.tolist() and len(built) == 1


def _write(folder, labels, ranges=None):
    """A rec of 8x8 PNG-less payloads (labels only matter here), optional insightface ranges."""
    folder.mkdir()
    w = mx.recordio.MXIndexedRecordIO(str(folder / "train.idx"), str(folder / "train.rec"), "w")
    n = len(labels)
    if ranges is not None:
        w.write_idx(0, mx.recordio.pack(mx.recordio.IRHeader(0, [n + 1, n + 1 + len(ranges)], 0, 0), b""))
    for i, c in enumerate(labels):
        key = i + 1 if ranges is not None else i
        w.write_idx(key, mx.recordio.pack(mx.recordio.IRHeader(0, float(c), key, 0), b"img"))
    for k, (lo, hi) in enumerate(ranges or []):
        w.write_idx(n + 1 + k, mx.recordio.pack(mx.recordio.IRHeader(0, [lo, hi], n + 1 + k, 0), b""))
    w.close()


def test_ranges_that_disagree_with_the_images_and_headerless_sets_read_every_header(tmp_path):
    labels = [1, 1, 0, 0, 2, 2]  # ranges say class 0 first: they do not describe these images
    _write(tmp_path / "bad", labels, ranges=[(1, 3), (3, 5), (5, 7)])
    assert RecordDataset(tmp_path / "bad").labels().tolist() == labels
    _write(tmp_path / "plain", [3, 0, 2])
    ds = RecordDataset(tmp_path / "plain")
    assert ds.labels().tolist() == [3, 0, 2] == mxnet_labels(tmp_path / "plain", range(3))
    assert (tmp_path / "plain" / "train.of_face_index.npz").is_file()


def test_read_only_data_caches_in_the_cache_folder(faces, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    mode = os.stat(faces).st_mode
    os.chmod(faces, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
    try:
        assert RecordDataset(faces).labels().tolist() == [i // 5 for i in range(45)]
        assert not list(faces.glob("*.of_face_index.npz"))
        assert len(list((tmp_path / "cache" / "of_face" / "index").glob("*.npz"))) == 1
    finally:
        os.chmod(faces, mode)


def test_only_rank_0_builds_the_index(faces, tmp_path):
    out = tmp_path / "ranks.json"
    launch([os.path.join("tests", "workers", "record_index_ranks.py"), out, faces], nproc=2, timeout=300)
    r0, r1 = (json.loads((tmp_path / f"ranks.json.{r}").read_text()) for r in (0, 1))
    assert (r0["builds"], r1["builds"]) == (1, 0)
    assert r0["labels"] == r1["labels"] == [i // 5 for i in range(45)]
