"""RecordDataset against the shared glint14 set and hand-written files; ShardedLoader sharding."""
import io
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

mx = pytest.importorskip("mxnet")
# mxnet 1.9 calls numpy/scipy APIs that newer versions deprecate; not ours to fix.
pytestmark = [pytest.mark.filterwarnings("ignore:tostring:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:Please import:DeprecationWarning")]
from of_face.data.loader import ShardedLoader  # noqa: E402
from of_face.data.recordio import RecordDataset  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GLINT14 = SHARED / "data" / "glint14"
# Images per label, from the table in shared/data/README.md.
GLINT14_COUNTS = [109, 200, 200, 200, 200, 200, 66, 200, 200, 22, 200, 200, 200, 200]


@pytest.fixture(scope="module")
def glint14():
    if not (GLINT14 / "train.rec").is_file():
        pytest.skip(f"shared data not found at {GLINT14}")
    return RecordDataset(GLINT14)


def _png(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _write_rec(folder, payloads, labels):
    """A headerless indexed .rec (plain im2rec style): keys 0..n-1, every record an image."""
    writer = mx.recordio.MXIndexedRecordIO(str(folder / "data.idx"), str(folder / "data.rec"), "w")
    for key, (payload, label) in enumerate(zip(payloads, labels)):
        writer.write_idx(key, mx.recordio.pack(mx.recordio.IRHeader(0, label, key, 0), payload))
    writer.close()
    return folder / "data.rec"


def test_glint14_counts_and_labels(glint14):
    assert len(glint14) == 2397
    assert glint14.num_classes == 14
    labels = glint14.labels()
    assert labels.dtype == np.int64
    assert np.bincount(labels).tolist() == GLINT14_COUNTS
    # labels() reads headers itself: compare with mxnet's unpack on a spread of records.
    reader = mx.recordio.MXIndexedRecordIO(str(GLINT14 / "train.idx"), str(GLINT14 / "train.rec"), "r")
    for index in (0, 108, 109, 1000, 2396):
        header, payload = mx.recordio.unpack(reader.read_idx(index + 1))  # images are records 1..2397
        assert labels[index] == int(header.label)
        image, label = glint14[index]
        assert label == labels[index]
        assert image.shape == (112, 112, 3) and image.dtype == np.uint8
        # Decoded by mxnet's own (OpenCV) JPEG decoder: same picture up to IDCT rounding.
        reference = mx.image.imdecode(payload).asnumpy()
        assert np.abs(image.astype(int) - reference).mean() < 1.5
    reader.close()


def test_glint14_by_rec_path_and_pickling(glint14):
    by_path = RecordDataset(GLINT14 / "train.rec")
    assert len(by_path) == 2397 and by_path.num_classes == 14
    copy = pickle.loads(pickle.dumps(glint14))  # the open mxnet handle must not travel
    assert copy._reader is None
    image, label = copy[2396]
    assert label == 13 and np.array_equal(image, glint14[2396][0])


def test_headerless_rec_with_vector_labels(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (20, 24, 3), dtype=np.uint8) for _ in range(5)]
    grey = rng.integers(0, 256, (20, 24), dtype=np.uint8)  # a greyscale picture comes back as RGB
    payloads = [_png(im) for im in images] + [_png(grey)]
    classes = [3, 0, 1, 3, 2, 4]
    rec = _write_rec(tmp_path, payloads, [[c, 7.5] for c in classes])
    ds = RecordDataset(rec)
    assert len(ds) == 6
    assert ds.num_classes == 5  # no property file: max label + 1
    assert ds.labels().tolist() == classes
    for key, expected in enumerate(images):
        image, label = ds[key]
        assert label == classes[key]
        np.testing.assert_array_equal(image, expected)
    image, label = ds[5]
    assert image.shape == (20, 24, 3) and label == 4
    np.testing.assert_array_equal(image, np.repeat(grey[:, :, None], 3, axis=2))


def test_undecodable_record_names_file_and_record(tmp_path):
    good = _png(np.zeros((8, 8, 3), np.uint8))
    rec = _write_rec(tmp_path, [good, good, good, b"this is not an image"], [0.0, 1.0, 2.0, 3.0])
    ds = RecordDataset(tmp_path / "data.idx")
    assert ds[2][1] == 2
    with pytest.raises(ValueError, match=r"data\.rec.*record 3"):
        ds[3]
    with pytest.raises(IndexError):
        ds[4]
    assert rec.exists()


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        RecordDataset(tmp_path / "nowhere")
    (tmp_path / "train.rec").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"train\.idx"):
        RecordDataset(tmp_path)


class IndexedImages:
    """Item i is an image whose pixels encode i (and are asymmetric, so a mirror shows); label i."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        x = np.arange(112, dtype=np.int64).reshape(1, 112, 1)
        image = np.broadcast_to((i * 7 + x + np.array([0, 1, 2])) % 256, (112, 112, 3))
        return image.astype(np.uint8), i


def _collect(loader):
    images, labels = zip(*list(loader))
    return np.stack(images), np.stack(labels)


def test_shards_are_disjoint_cover_the_epoch_and_follow_the_seeded_order():
    n, batch, world = 37, 4, 2
    loaders = [ShardedLoader(IndexedImages(n), batch, rank, world, seed=3) for rank in range(world)]
    assert len(loaders[0]) == 37 // 8 == 4
    epoch0 = [_collect(loader)[1] for loader in loaders]
    assert all(labels.shape == (4, batch) and labels.dtype == np.int64 for labels in epoch0)
    seen = np.concatenate([labels.ravel() for labels in epoch0])
    assert len(seen) == len(set(seen.tolist())) == 4 * batch * world  # disjoint, 32 of the 37 items
    # Independent: global batch b is order[8b:8b+8] of rng([seed, epoch]).permutation; rank r its r-th 4.
    order = np.random.default_rng([3, 0]).permutation(n)
    for rank in range(world):
        expected = order[:32].reshape(4, world, batch)[:, rank]
        np.testing.assert_array_equal(epoch0[rank], expected)
    for loader in loaders:
        loader.set_epoch(1)
    epoch1 = np.concatenate([_collect(loader)[1].ravel() for loader in loaders])
    assert not np.array_equal(epoch1, seen)


def test_workers_give_identical_batches():
    plain = ShardedLoader(IndexedImages(50), 5, 1, 2, seed=1)
    pooled = ShardedLoader(IndexedImages(50), 5, 1, 2, seed=1, num_workers=2)
    try:
        for epoch in (0, 1):
            plain.set_epoch(epoch)
            pooled.set_epoch(epoch)
            a_images, a_labels = _collect(plain)
            b_images, b_labels = _collect(pooled)
            np.testing.assert_array_equal(a_labels, b_labels)
            np.testing.assert_array_equal(a_images, b_images)
    finally:
        pooled.close()


def test_flip_and_normalisation_by_hand():
    dataset = IndexedImages(40)
    images, labels = _collect(ShardedLoader(dataset, 8, 0, 1, seed=0))
    assert images.shape == (5, 8, 3, 112, 112) and images.dtype == np.float32
    flipped = 0
    for image, label in zip(images.reshape(-1, 3, 112, 112), labels.ravel()):
        raw = dataset[label][0].astype(np.float64)
        plain = ((raw / 255 - 0.5) / 0.5).transpose(2, 0, 1)
        mirrored = plain[:, :, ::-1]
        if np.allclose(image, mirrored, atol=1e-6):
            flipped += 1
        else:
            np.testing.assert_allclose(image, plain, atol=1e-6)
    assert 5 < flipped < 35  # about half of 40 coins
    images, _ = _collect(ShardedLoader(dataset, 8, 0, 1, seed=0, flip=False))
    expected = np.stack([(dataset[i][0] / 127.5 - 1).transpose(2, 0, 1) for i in labels.ravel()])
    np.testing.assert_allclose(images.reshape(-1, 3, 112, 112), expected, atol=1e-6)


def test_loader_on_glint14_normalises_like_a_hand_computation(glint14):
    loader = ShardedLoader(glint14, 2, 0, 1, shuffle=False, flip=False)
    images, labels = next(iter(loader))
    assert labels.tolist() == [0, 0]
    reader = mx.recordio.MXIndexedRecordIO(str(GLINT14 / "train.idx"), str(GLINT14 / "train.rec"), "r")
    _, payload = mx.recordio.unpack(reader.read_idx(2))  # dataset index 1 is record 2
    reader.close()
    pixels = np.asarray(Image.open(io.BytesIO(payload)).convert("RGB"), np.float64)
    np.testing.assert_allclose(images[1], ((pixels / 255 - 0.5) / 0.5).transpose(2, 0, 1), atol=1e-6)
    assert images.min() >= -1 and images.max() <= 1
    assert images.min() < -0.9 and images.max() > 0.9


def test_truncated_rec_is_reported_with_file_and_record(tmp_path):
    if not (GLINT14 / "train.rec").is_file():
        pytest.skip(f"shared data not found at {GLINT14}")
    data = (GLINT14 / "train.rec").read_bytes()
    index = (GLINT14 / "train.idx").read_text()
    # cut in the middle of the images: the index points past the end of the file
    (tmp_path / "train.rec").write_bytes(data[: len(data) // 2])
    (tmp_path / "train.idx").write_text(index)
    with pytest.raises(ValueError,
                       match=r"train.rec: truncated or not matching .*train.idx \(record \d+ starts at byte"):
        RecordDataset(tmp_path)
    # cut inside the last image record only (its start is still inside the file)
    offsets = sorted(int(line.split("\t")[1]) for line in index.splitlines())
    last_image_start = offsets[2397]  # record 2397 = the last image (header is record 0)
    cut = tmp_path / "cut"
    cut.mkdir()
    keep = [line for line in index.splitlines() if int(line.split("\t")[0]) <= 2397]
    (cut / "train.idx").write_text("\n".join(keep) + "\n")
    (cut / "train.rec").write_bytes(data[: last_image_start + 20])
    (cut / "property").write_text((GLINT14 / "property").read_text())
    ds = RecordDataset(cut)
    with pytest.raises(ValueError, match=r"record 2397 is truncated"):
        ds[len(ds) - 1]


def test_wrong_image_size_names_the_record(tmp_path):
    rec = mx.recordio.MXIndexedRecordIO(str(tmp_path / "train.idx"), str(tmp_path / "train.rec"), "w")
    for key, size in enumerate([112, 100]):
        rec.write_idx(key, mx.recordio.pack(mx.recordio.IRHeader(0, 0.0, key, 0),
                                            _png(np.zeros((size, size, 3), np.uint8))))
    rec.close()
    (tmp_path / "property").write_text("1,112,112\n")
    ds = RecordDataset(tmp_path)
    assert ds[0][0].shape == (112, 112, 3)
    with pytest.raises(ValueError, match=r"train.rec: record 1 is 100x100, expected 112x112"):
        ds[1]
