"""Evaluation commands: one `error:` line and exit status 2 (a refused input) for a missing or
unreadable model, .bin or IJB layout (every missing meta/ file named at once), --device cuda
refused clearly without the CUDA onnxruntime / GPU, the normalisation read from an of_face
export's metadata, and compare's warnings for an uncalibrated threshold and for flat images."""
import io

import numpy as np
import oneflow as flow
from PIL import Image

from conftest import SHARED, need, tiny_onnx
from of_face.cli import main as cli
from of_face.eval import onnx_embedder
from of_face.eval.embedders import make_embedder

MODEL = SHARED / "models" / "mobilefacenet_192d.onnx"


def run(capsys, args):
    """(exit status, stdout, [stderr lines]) of `of-face ARGS`."""
    capsys.readouterr()
    try:
        cli(args)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, [line for line in out.err.splitlines() if line.strip()]


def test_normalisation_read_from_export_metadata(tmp_path):
    model = tiny_onnx(tmp_path / "m.onnx", {"mean": "10", "std": "2"})
    images = np.random.default_rng(0).integers(0, 256, (2, 112, 112, 3), dtype=np.uint8)
    want = (images.astype(np.float64).mean(axis=(1, 2)) - 10) / 2
    np.testing.assert_allclose(make_embedder(model=str(model))(images), want, rtol=1e-5)
    # an explicit --std wins over the metadata; no metadata: 127.5 / 127.5
    np.testing.assert_allclose(make_embedder(model=str(model), std=4.0)(images), (want * 2) / 4, rtol=1e-5)
    plain = tiny_onnx(tmp_path / "p.onnx")
    np.testing.assert_allclose(make_embedder(model=str(plain))(images),
                               (images.astype(np.float64).mean(axis=(1, 2)) - 127.5) / 127.5, rtol=1e-5)


def test_help_says_which_normalisation(capsys):
    code, out, _ = run(capsys, ["ijbc", "--help"])
    assert code == 0
    text = " ".join(out.split())
    assert "an of_face export's metadata" in text and "128 for the shared MobileFaceNet" in text


def test_missing_model_and_checkpoint(capsys, tmp_path):
    code, _, err = run(capsys, ["verify", "--model", str(tmp_path / "nope.onnx"), "--bin", "x.bin"])
    assert code == 2 and err == [f"error: {tmp_path / 'nope.onnx'}: not found (--model: ONNX file)"]
    code, _, err = run(capsys, ["ijbc", "--checkpoint", str(tmp_path / "run"), "--image-path", str(tmp_path)])
    assert code == 2 and err == [f"error: {tmp_path / 'run'}: not found (--checkpoint: run folder or backbone.npz)"]


def test_model_that_is_not_onnx(capsys, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_text("not a model")
    code, _, err = run(capsys, ["verify", "--model", str(bad), "--bin", "x.bin"])
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {bad}: ")


def test_missing_and_unreadable_bin(capsys, tmp_path):
    model = tiny_onnx(tmp_path / "m.onnx")
    code, _, err = run(capsys, ["verify", "--model", str(model), "--bin", str(tmp_path / "lfw.bin")])
    assert code == 2 and err == [f"error: {tmp_path / 'lfw.bin'}: No such file or directory"]
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"<html>")
    code, _, err = run(capsys, ["verify", "--model", str(model), "--bin", str(junk)])
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {junk}: not a readable verification .bin")


def test_all_missing_meta_files_at_once(capsys, tmp_path):
    model = tiny_onnx(tmp_path / "m.onnx")
    layout = tmp_path / "IJBC"
    (layout / "meta").mkdir(parents=True)
    (layout / "meta" / "ijbc_face_tid_mid.txt").write_text("1.jpg 1 1\n")
    code, _, err = run(capsys, ["ijbc", "--model", str(model), "--image-path", str(layout)])
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"error: {layout}: missing meta/ijbc_name_5pts_score.txt, "
                             "meta/ijbc_template_pair_label.txt, loose_crop (an IJBC layout")


def test_device_cuda_without_cuda_onnxruntime(capsys, tmp_path, monkeypatch):
    model = tiny_onnx(tmp_path / "m.onnx")
    monkeypatch.setattr(onnx_embedder.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    code, _, err = run(capsys, ["verify", "--model", str(model), "--bin", "x.bin", "--device", "cuda"])
    assert code == 2 and len(err) == 1
    assert "--device cuda: this onnxruntime" in err[0] and "install onnxruntime-gpu==" in err[0]
    monkeypatch.setattr(onnx_embedder.ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert onnx_embedder.providers("cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_device_cuda_checkpoint_without_gpu(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(flow.cuda, "is_available", lambda: False)
    (tmp_path / "run").mkdir()
    code, _, err = run(capsys, ["verify", "--checkpoint", str(tmp_path / "run"), "--bin", "x.bin",
                                "--device", "cuda"])
    assert code == 2 and len(err) == 1 and "OneFlow sees no CUDA GPU" in err[0]


def test_compare_warns_on_flat_images_and_uncalibrated_threshold(capsys, tmp_path):
    need(MODEL)
    a, b = tmp_path / "red.png", tmp_path / "blue.png"
    Image.new("RGB", (112, 112), (200, 30, 30)).save(a)
    Image.new("RGB", (112, 112), (30, 30, 200)).save(b)
    code, out, err = run(capsys, ["compare", str(a), str(b), "--model", str(MODEL), "--std", "128"])
    assert code == 0 and "decision:" in out
    assert [line.split(":")[0] + ":" + line.split(":")[1] for line in err] == [f"warning: {a}", f"warning: {b}"]
    assert all("almost no variation (pixel std 0.00 grey levels)" in line for line in err)
    # the shared model with its own normalisation is what the default was calibrated on: no warning;
    # with another normalisation it is another model as far as the threshold goes
    code, out, err = run(capsys, ["compare", str(a), str(a), "--model", str(MODEL), "--std", "127.5"])
    assert any("default threshold 0.28 was calibrated for the shared MobileFaceNet" in line for line in err)


def test_truncated_bin_named(tmp_path):
    from of_face.data.verification_bin import load_bin, write_bin

    good = tmp_path / "v.bin"
    png = io.BytesIO()
    Image.new("RGB", (112, 112), (1, 2, 3)).save(png, format="PNG")
    write_bin(good, [png.getvalue()] * 4, [True, False])
    data = good.read_bytes()
    cut = tmp_path / "cut.bin"
    cut.write_bytes(data[: len(data) // 2])
    try:
        load_bin(cut)
    except ValueError as e:
        assert str(e).startswith(f"{cut}: not a readable verification .bin (cut short: ")
    else:
        raise AssertionError("a truncated .bin was read")
