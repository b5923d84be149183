"""The synthetic set is read back with plain mxnet/pickle/PIL, not with of_face's own readers."""
import io
import json
import pickle

import numpy as np
import pytest
from PIL import Image

mx = pytest.importorskip("mxnet")
# mxnet 1.9 calls numpy/scipy APIs that newer versions deprecate; not ours to fix.
pytestmark = [pytest.mark.filterwarnings("ignore:tostring:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:Please import:DeprecationWarning")]
from of_face.data import synthetic  # noqa: E402

TINY = dict(num_identities=6, images_per_identity=4, val_identities=4, val_pairs=8)
FILES = ["train.rec", "train.idx", "property", "synth_val.bin", "synthetic.json"]


def _records(folder):
    reader = mx.recordio.MXIndexedRecordIO(str(folder / "train.idx"), str(folder / "train.rec"), "r")
    try:
        return {key: mx.recordio.unpack(reader.read_idx(key)) for key in reader.keys}
    finally:
        reader.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synth") / "a"
    summary = synthetic.generate(folder, seed=0, **TINY)
    return folder, summary


def test_recordio_layout_matches_insightface(tiny):
    folder, _ = tiny
    records = _records(folder)
    # 6 x 4 images in records 1..24, range records 25..30, header 0.
    assert sorted(records) == list(range(31))
    header, payload = records[0]
    assert header.flag == 2 and payload == b""
    assert header.label.tolist() == [25.0, 31.0]
    for key in range(1, 25):
        head, payload = records[key]
        assert head.flag == 0 and head.id == key
        assert head.label == float((key - 1) // 4)
        image = np.asarray(Image.open(io.BytesIO(payload)).convert("RGB"))
        assert image.shape == (112, 112, 3)
        assert image.std() > 10  # a drawing, not a flat fill
    for label in range(6):
        head, payload = records[25 + label]
        assert head.flag == 2 and payload == b""
        assert head.label.tolist() == [1 + 4 * label, 5 + 4 * label]
    assert (folder / "property").read_text().strip() == "6,112,112"


def test_validation_bin_pairs_are_open_set_and_balanced(tiny):
    folder, summary = tiny
    with open(folder / "synth_val.bin", "rb") as f:
        bins, issame = pickle.load(f)
    assert len(bins) == 16 and len(issame) == 8
    assert sum(issame) == 4 and all(isinstance(s, bool) for s in issame)
    assert issame[0::2] == [True] * 4 and issame[1::2] == [False] * 4  # interleaved: balanced folds
    for raw in bins:
        assert np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")).shape == (112, 112, 3)
    assert len(set(bins)) == 16  # every slot is its own rendering, never an image paired with itself

    stamp = json.loads((folder / "synthetic.json").read_text())
    train_ids, val_ids = set(stamp["train_identity_ids"]), set(stamp["val_identity_ids"])
    assert len(train_ids) == 6 and len(val_ids) == 4 and not train_ids & val_ids
    pair_ids = stamp["val_pair_identities"]
    assert len(pair_ids) == 8
    for (a, b), same in zip(pair_ids, issame):
        assert {a, b} <= val_ids
        assert (a == b) == same
    assert stamp["params"] == {**synthetic.DEFAULTS, **TINY, "seed": 0}
    assert summary["val_pair_identities"] == pair_ids


def test_identities_differ_and_images_of_one_identity_vary():
    params = [synthetic.identity_params(0, i) for i in range(3)]
    assert not np.allclose(params[0]["skin"], params[1]["skin"])
    images = synthetic.render(params[0], 3, np.random.default_rng(5))
    assert images.shape == (3, 112, 112, 3) and images.dtype == np.uint8
    assert np.abs(images[0].astype(int) - images[1]).mean() > 5
    # difficulty 0 removes every nuisance except background and clothes: the face centre is fixed.
    calm = synthetic.render(params[0], 2, np.random.default_rng(5), difficulty=0)
    centre = calm[:, 40:80, 40:72].astype(int)
    assert np.abs(centre[0] - centre[1]).max() <= 1


def test_same_seed_same_bytes_other_seed_differs(tiny, tmp_path):
    folder, _ = tiny
    synthetic.generate(tmp_path / "b", seed=0, **TINY)
    for name in FILES:
        assert (folder / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    synthetic.generate(tmp_path / "c", seed=1, **TINY)
    for name in ("train.rec", "synth_val.bin"):
        assert (folder / name).read_bytes() != (tmp_path / "c" / name).read_bytes(), name


def test_ensure_reuses_matching_set_and_replaces_stale_one(tmp_path):
    target = tmp_path / "set"
    first = synthetic.ensure(target, **TINY)
    assert "seconds" in first  # it generated
    mtime = (target / "train.rec").stat().st_mtime_ns
    again = synthetic.ensure(target, **TINY)
    assert "seconds" not in again and (target / "train.rec").stat().st_mtime_ns == mtime
    changed = synthetic.ensure(target, **{**TINY, "num_identities": 5})
    assert changed["num_classes"] == 5
    assert _records(target)[0][0].label.tolist() == [21.0, 26.0]
    # Only the set and the lock file are left next to it: no temporary folders.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".set.lock", "set"]

    other = tmp_path / "user_folder"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        synthetic.ensure(other, **TINY)
    assert (other / "notes.txt").read_text() == "keep me"


def test_bad_parameters_are_refused(tmp_path):
    with pytest.raises(ValueError, match="even"):
        synthetic.generate(tmp_path, **{**TINY, "val_pairs": 7})
    with pytest.raises(TypeError, match="unknown"):
        synthetic.generate(tmp_path, identities=3)
