"""`Data.dataset: folder` through the trainer: prepare_data opens label.txt and folder-per-identity sets
with the class checks, wrong-size images stop without `Data.resize` (folder and rec) and are resized with
it, and a short 2-rank training run sees exactly the labels that label.txt gives its images."""
import io

import numpy as np
import pytest
from PIL import Image

from of_face.config import ConfigError, load_config
from of_face.data.folder import FolderDataset, LabelTxtDataset
from of_face.data.loader import ShardedLoader

from conftest import REPO, run_worker

RED = [30, 90, 150, 210]  # identity k's images have this constant red channel: the label is readable off pixels
NAMES = "dcba"  # label.txt gives folder NAMES[k] label k; sorted folder order would give the reverse


def _face(label, seed, size=(112, 112)):
    image = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image[..., 0] = RED[label]  # constant: survives flip, crop and bilinear resize exactly
    return image


def make_set(root, sizes=((112, 112),)):
    lines = []
    for k, name in enumerate(NAMES):
        (root / name).mkdir(parents=True)
        for j in range(4):
            size = sizes[(4 * k + j) % len(sizes)]
            Image.fromarray(_face(k, 10 * k + j, size)).save(root / name / f"{j}.png")
            lines.append(f"{name}/{j}.png\t{k}\n")
    (root / "label.txt").write_text("".join(lines))
    return root


def config(root, *extra, dataset="folder"):
    return load_config(REPO / "configs/default.yaml",
                       [f"Data.dataset={dataset}", f"Data.root={root}", "Data.val_targets=[]", *extra])


def test_prepare_data_opens_both_folder_layouts_with_the_class_checks(tmp_path):
    from of_face.train.trainer import prepare_data

    make_set(tmp_path)
    dataset, num_classes = prepare_data(config(tmp_path))
    assert isinstance(dataset, LabelTxtDataset) and num_classes == 4 and len(dataset) == 16
    for i in range(len(dataset)):
        image, label = dataset[i]
        assert dataset.paths[i].parent.name == NAMES[label] and (image[..., 0] == RED[label]).all()
    with pytest.raises(ConfigError, match=r"Loss.num_classes=5 but .* holds 4 classes"):
        prepare_data(config(tmp_path, "Loss.num_classes=5"))
    (tmp_path / "label.txt").write_text("d/0.png\t0\nc/0.png\t1\nb/0.png\tone\n")
    with pytest.raises(ConfigError, match=r"Data.root: .*label\.txt: line 3: label 'one' is not an integer"):
        prepare_data(config(tmp_path))
    (tmp_path / "label.txt").unlink()  # now one folder per identity: sorted names a, b, c, d -> 0..3
    dataset, num_classes = prepare_data(config(tmp_path))
    assert isinstance(dataset, FolderDataset) and num_classes == 4
    assert dataset.labels().tolist() == [i // 4 for i in range(16)]
    assert all((dataset[i][0][..., 0] == RED[3 - dataset[i][1]]).all() for i in range(16))


def test_wrong_size_images_stop_without_resize_and_are_resized_with_it(tmp_path):
    from of_face.train.trainer import prepare_data

    make_set(tmp_path, sizes=((112, 112), (120, 100)))
    dataset, _ = prepare_data(config(tmp_path))
    with pytest.raises(ValueError, match=r"[0-9]\.png: image is 120x100, expected 112x112 \(set Data.resize=true"):
        list(ShardedLoader(dataset, 16, 0, 1, shuffle=False))
    dataset, _ = prepare_data(config(tmp_path, "Data.resize=true"))
    for i, path in enumerate(dataset.paths):
        original = Image.open(path).convert("RGB")
        expected = np.asarray(original.resize((112, 112), Image.BILINEAR)) if original.size != (112, 112) else original
        np.testing.assert_array_equal(dataset[i][0], expected)


def test_rec_records_of_the_wrong_size_stop_without_resize_and_are_resized_with_it(tmp_path):
    """A bare im2rec file (no `property`) is held to 112x112 by the trainer too."""
    mx = pytest.importorskip("mxnet")
    from of_face.train.trainer import prepare_data

    images = [_face(0, 1), _face(1, 2, size=(96, 96))]
    rec = mx.recordio.MXIndexedRecordIO(str(tmp_path / "train.idx"), str(tmp_path / "train.rec"), "w")
    for key, image in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        rec.write_idx(key, mx.recordio.pack(mx.recordio.IRHeader(0, float(key), key, 0), buf.getvalue()))
    rec.close()
    dataset, num_classes = prepare_data(config(tmp_path, dataset="rec"))
    assert num_classes == 2
    np.testing.assert_array_equal(dataset[0][0], images[0])
    with pytest.raises(ValueError, match=r"train\.rec: record 1 is 96x96, expected 112x112 .*Data.resize=true"):
        dataset[1]
    dataset, _ = prepare_data(config(tmp_path, "Data.resize=true", dataset="rec"))
    expected = np.asarray(Image.fromarray(images[1]).resize((112, 112), Image.BILINEAR))
    np.testing.assert_array_equal(dataset[1][0], expected)
    assert dataset[1][1] == 1


def test_two_rank_training_on_a_label_txt_folder_sees_its_labels(tmp_path):
    """Mixed-size images (resized), random crop on, 2 loader workers, 2 epochs of 2 global batches of 8:
    every image a step receives carries the label label.txt gives it (read back from its red channel),
    each epoch covers all 16 images once, and the losses are finite."""
    root = make_set(tmp_path / "faces", sizes=((112, 112), (120, 100), (100, 100)))
    res = run_worker("train_folder", tmp_path / "run.json", nproc=2, extra=[
        "Data.dataset=folder", f"Data.root={root}", "Data.val_targets=[]", "Data.resize=true",
        "Data.random_crop=0.2", "Data.num_workers=2", "Data.batch_size=4", "Global.epochs=2", "Global.max_steps=4",
        "Global.log_interval=1", "Global.eval_before_training=false", f"Global.output_dir={tmp_path / 'out'}",
        "Model.width=8"])
    assert res["steps"] == 4 and res["num_classes"] == 4 and res["images"] == 16
    assert len(res["losses"]) == 4 and np.isfinite(res["losses"]).all()
    assert len(res["batches"]) == 4
    for epoch in range(2):
        seen = []
        for batch in res["batches"][2 * epoch: 2 * epoch + 2]:
            pixels = (np.asarray(batch["red"]) * 0.5 + 0.5) * 255  # undo the normalisation
            from_pixels = [RED.index(int(round(p))) for p in pixels]
            assert batch["labels"] == from_pixels
            seen += batch["labels"]
        assert np.bincount(seen, minlength=4).tolist() == [4, 4, 4, 4]
