"""The trainer refuses a training set that disagrees with the config, naming the file and value."""
import shutil

import pytest

from of_face.config import ConfigError, load_config

from conftest import REPO


@pytest.fixture
def tiny_set(tmp_path, synthetic_faces):
    return shutil.copytree(synthetic_faces(6, 2), tmp_path / "faces")  # a copy: a test rewrites its property


def config(root, *extra):
    return load_config(REPO / "configs/default.yaml", ["Data.dataset=rec", f"Data.root={root}", *extra])


def test_num_classes_mismatch(tiny_set):
    from of_face.train.trainer import prepare_data

    with pytest.raises(ConfigError, match=r"Loss.num_classes=7 but .* holds 6 classes"):
        prepare_data(config(tiny_set, "Loss.num_classes=7"))


def test_label_outside_the_class_range(tiny_set):
    from of_face.train.trainer import prepare_data

    (tiny_set / "property").write_text("4,112,112\n")  # images carry labels 0..5
    with pytest.raises(ConfigError, match=r"image 8 has label 4, outside 0..3 \(4 such images\)"):
        prepare_data(config(tiny_set))


def test_missing_data_folder(tmp_path):
    from of_face.train.trainer import prepare_data

    with pytest.raises(ConfigError, match=r"Data.root: folder not found: .*nowhere"):
        prepare_data(config(tmp_path / "nowhere"))
