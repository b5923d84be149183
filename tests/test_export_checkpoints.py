"""Export and eval take a run folder with only ckpt-* checkpoints, or one checkpoint file, and
say which one they used. Checked against the same weights read through backbone.npz."""
import shutil
import subprocess

import numpy as np
import pytest

from conftest import REPO, tiny, train


@pytest.fixture(scope="module")
def run(synthetic_faces, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(tiny(synthetic_faces(8, 4), out, "Global.mode=eager", "Data.batch_size=8", "Global.max_steps=4",
               "Global.epochs=5", "Global.save_interval=2", "Global.keep_checkpoints=0"), nproc=1)
    return out


def test_checkpoint_only_folder_and_file(run, tmp_path, capsys):
    from of_face.eval.embedders import make_embedder
    from of_face.export import load_model

    only = tmp_path / "only_ckpts"  # what a killed run leaves: checkpoints, no backbone.npz / config.yaml
    only.mkdir()
    for name in ("ckpt-00000002.npz", "ckpt-00000004.npz"):
        shutil.copy(run / name, only / name)
    model, cfg, used = load_model(only)
    assert used == str(only / "ckpt-00000004.npz") and cfg.width == 8 and cfg.embedding_size == 32
    with np.load(run / "backbone.npz") as f:  # the end-of-run backbone = the step-4 checkpoint's
        for k, v in model.state_dict().items():
            np.testing.assert_array_equal(v.numpy(), f[k], err_msg=k)
    _, _, used = load_model(only / "ckpt-00000002.npz")
    assert used == str(only / "ckpt-00000002.npz")
    with np.load(only / "ckpt-00000002.npz") as f:
        step2 = f["model/backbone.conv1.weight"]
    assert not np.array_equal(step2, model.state_dict()["conv1.weight"].numpy())  # another step, other weights

    images = np.random.default_rng(0).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    from_ckpt = make_embedder(checkpoint=str(only))(images)
    assert f"embedding with {only / 'ckpt-00000004.npz'} (iresnet)" in capsys.readouterr().err
    np.testing.assert_array_equal(from_ckpt, make_embedder(checkpoint=str(run))(images))
    with pytest.raises(FileNotFoundError, match=r"holds no backbone.npz and no complete ckpt-\* training"):
        load_model(tmp_path)


def test_export_cli_names_the_checkpoint(run, tmp_path):
    only = tmp_path / "only"
    only.mkdir()
    shutil.copy(run / "ckpt-00000004.npz", only / "ckpt-00000004.npz")
    proc = subprocess.run(["bash", "scripts/export_onnx.sh", "-c", str(only), "--out", str(tmp_path / "m.onnx")],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"from {only / 'ckpt-00000004.npz'}" in proc.stdout and (tmp_path / "m.onnx").is_file()
