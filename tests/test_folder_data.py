"""Image-folder readers: label.txt (PLSC) and folder-per-identity layouts, and their error messages."""
import numpy as np
import pytest
from PIL import Image

from of_face.data.folder import FolderDataset, LabelTxtDataset, open_image_dataset


def _image(seed, size=(112, 112)):
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def _make_set(root, counts=(3, 1, 2), names=("bob", "alice", "carol")):
    """Folder-per-identity PNGs plus a label.txt describing the same files; returns expected samples."""
    expected = {}
    lines = []
    # sorted names: alice -> 0, bob -> 1, carol -> 2
    label_of = {n: i for i, n in enumerate(sorted(names))}
    seed = 0
    for name, count in zip(names, counts):
        (root / name).mkdir(parents=True)
        for j in range(count):
            seed += 1
            arr = _image(seed)
            rel = f"{name}/{j:03d}.png"
            Image.fromarray(arr).save(root / rel)
            expected[rel] = (arr, label_of[name])
            lines.append(f"{rel}\t{label_of[name]}\n")
    (root / "label.txt").write_text("".join(lines))
    return expected


def test_label_txt_and_folder_give_same_samples(tmp_path):
    expected = _make_set(tmp_path)
    by_txt = LabelTxtDataset(tmp_path)
    by_dir = FolderDataset(tmp_path)
    assert len(by_txt) == len(by_dir) == 6
    assert by_txt.num_classes == by_dir.num_classes == 3
    assert by_dir.class_names == ["alice", "bob", "carol"]

    def collect(ds):
        out = {}
        for i in range(len(ds)):
            img, label = ds[i]
            assert img.dtype == np.uint8 and img.shape == (112, 112, 3)
            out[str(ds.paths[i].relative_to(tmp_path))] = (img, label)
        return out

    got_txt, got_dir = collect(by_txt), collect(by_dir)
    assert set(got_txt) == set(got_dir) == set(expected)
    for rel, (arr, label) in expected.items():
        for got in (got_txt, got_dir):
            assert got[rel][1] == label
            np.testing.assert_array_equal(got[rel][0], arr)
    assert sorted(by_txt.labels().tolist()) == sorted(by_dir.labels().tolist()) == [0, 1, 1, 1, 2, 2]
    assert [by_dir[i][1] for i in range(len(by_dir))] == by_dir.labels().tolist()
    assert isinstance(open_image_dataset(tmp_path), LabelTxtDataset)
    (tmp_path / "label.txt").unlink()
    assert isinstance(open_image_dataset(tmp_path), FolderDataset)


def test_label_txt_space_separator(tmp_path):
    Image.fromarray(_image(1)).save(tmp_path / "a.png")
    Image.fromarray(_image(2)).save(tmp_path / "b.png")
    (tmp_path / "label.txt").write_text("a.png 4\n\nb.png 0\n")
    ds = LabelTxtDataset(tmp_path)
    assert ds.labels().tolist() == [4, 0] and ds.num_classes == 5
    np.testing.assert_array_equal(ds[1][0], _image(2))


@pytest.mark.parametrize("content, message", [
    ("a.png\t0\nmissing.png\t1\n", r"label\.txt: line 2: image file not found: .*missing\.png"),
    ("a.png\t0\na.png\t-1\n", r"label\.txt: line 2: label -1 is negative"),
    ("a.png\tzero\n", r"label\.txt: line 1: label 'zero' is not an integer"),
    ("a.png\t1.5\n", r"label\.txt: line 1: label '1\.5' is not an integer"),
    ("a.png\n", r"label\.txt: line 1 is not 'path<TAB>label'"),
])
def test_label_txt_errors(tmp_path, content, message):
    Image.fromarray(_image(1)).save(tmp_path / "a.png")
    (tmp_path / "label.txt").write_text(content)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        LabelTxtDataset(tmp_path)


def test_empty_identity_folder(tmp_path):
    _make_set(tmp_path)
    (tmp_path / "dave").mkdir()
    (tmp_path / "dave" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"dave: identity folder holds no images"):
        FolderDataset(tmp_path)


def test_wrong_size_errors_or_resizes(tmp_path):
    (tmp_path / "x").mkdir()
    big = _image(3, size=(120, 100))  # W 120, H 100
    Image.fromarray(big).save(tmp_path / "x" / "big.png")
    ds = FolderDataset(tmp_path)
    with pytest.raises(ValueError, match=r"big\.png: image is 120x100, expected 112x112"):
        ds[0]
    img, label = FolderDataset(tmp_path, resize=True)[0]
    ref = np.asarray(Image.fromarray(big).resize((112, 112), Image.BILINEAR))
    assert img.shape == (112, 112, 3) and label == 0
    np.testing.assert_array_equal(img, ref)


def test_missing_roots(tmp_path):
    with pytest.raises(FileNotFoundError, match="label.txt"):
        LabelTxtDataset(tmp_path)
    with pytest.raises(ValueError, match="no identity sub-folders"):
        FolderDataset(tmp_path)
