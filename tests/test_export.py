"""ONNX export of a trained backbone: onnxruntime vs OneFlow eager parity at several batch sizes
(dynamic batch), names and shapes, baked normalisation, atomic writes, and the checkpoint
embedder against the same independent OneFlow forward pass."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import of_face  # noqa: F401  (before oneflow)
import oneflow as flow
import onnx
import onnxruntime as ort

from of_face.models.weights import load_backbone, save_backbone
from of_face.config import load_config, save_config
from of_face.models import build_backbone

from conftest import REPO
from conftest import TINY_MODEL as TINY  # the tiny run's backbone, here built directly, not trained


def make_run(out_dir, overrides=TINY, seed=0):
    """A fake training run folder: backbone.npz (non-trivial norm statistics) + config.yaml."""
    cfg = load_config(None, list(overrides) + [f"Global.output_dir={out_dir}"])
    flow.manual_seed(seed)
    model = build_backbone(cfg.Model)
    rng = np.random.default_rng(seed)

    def fill(t, values):
        t.copy_(flow.tensor(np.asarray(values, dtype=np.float32)))

    # Fresh BN/LayerNorms are identities (mean 0, var 1, scale 1, shift 0) and PReLU slopes all
    # equal: give them random values so a converter that drops or mis-folds them cannot pass.
    bns = []
    with flow.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, (flow.nn.BatchNorm1d, flow.nn.BatchNorm2d)):
                bns.append(m)
                if name != "features":  # IResNet's embedding BN keeps its frozen scale of 1.0
                    fill(m.weight, rng.uniform(0.5, 1.5, m.num_features))
                fill(m.bias, rng.normal(0.0, 0.2, m.num_features))
            elif isinstance(m, flow.nn.LayerNorm):
                fill(m.weight, rng.uniform(0.5, 1.5, m.weight.shape))
                fill(m.bias, rng.normal(0.0, 0.2, m.bias.shape))
            elif isinstance(m, flow.nn.PReLU):
                fill(m.weight, rng.uniform(0.05, 0.4, m.weight.shape))
            elif isinstance(m, flow.nn.Linear) and m.bias is not None:
                fill(m.bias, rng.normal(0.0, 0.1, m.bias.shape))
        # Running statistics as training leaves them: those of real activations (one train-mode
        # pass with momentum 1), scaled off a little so eval-mode BN is not a plain standardisation.
        for m in bns:
            m.momentum = 1.0
        model.train()
        model(flow.tensor(normalized(pixels(8, seed + 100))))
        for m in bns:
            m.momentum = 0.1
            fill(m.running_mean, m.running_mean.numpy() + rng.normal(0.0, 0.05, m.num_features))
            fill(m.running_var, m.running_var.numpy() * rng.uniform(0.8, 1.25, m.num_features))
    os.makedirs(out_dir, exist_ok=True)
    save_backbone(model, str(out_dir), 123)
    save_config(cfg, os.path.join(out_dir, "config.yaml"))
    return cfg


def reference_model(run_dir, cfg):
    model = build_backbone(cfg.Model)
    load_backbone(model, os.path.join(run_dir, "backbone.npz"))
    model.eval()
    return model


def oneflow_forward(model, x):
    with flow.no_grad():
        return model(flow.tensor(x, dtype=flow.float32)).numpy()


def pixels(n, seed):
    """uint8 [n, 3, 112, 112]: per image a random colour, gradient and stripe pattern plus noise,
    so that images differ in more than noise (which pooling heads average away)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:112, 0:112] / 112.0
    out = np.empty((n, 3, 112, 112))
    for i in range(n):
        a = rng.uniform(-80, 80, (3, 2, 1, 1))
        fx, fy, ph = rng.uniform(1, 5), rng.uniform(1, 5), rng.uniform(0, 2 * np.pi)
        out[i] = (rng.uniform(60, 200, (3, 1, 1)) + a[:, 0] * (xx - 0.5) + a[:, 1] * (yy - 0.5)
                  + 40 * np.sin(2 * np.pi * (fx * xx + fy * yy) + ph) + rng.normal(0, 15, (3, 112, 112)))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def normalized(px):
    # insightface onnx_ijbc.py: (x - 127.5) / 127.5, written out independently of of_face.
    return ((px.astype(np.float64) - 127.5) / 127.5).astype(np.float32)


def session(path):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One tiny run, exported twice: default through the API, baked through the shell script."""
    from of_face.export import export_onnx

    root = tmp_path_factory.mktemp("export")
    run = root / "run"
    cfg = make_run(str(run))
    info = export_onnx(run, root / "out" / "model.onnx", opset=11)
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "export_onnx.sh"), "-c", str(run), "-o", str(root / "baked.onnx"),
         "--opset", "13", "--bake-normalization"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"root": root, "run": run, "cfg": cfg, "info": info, "onnx": root / "out" / "model.onnx",
            "baked": root / "baked.onnx", "script_out": proc.stdout}


def test_parity_with_oneflow_at_several_batch_sizes(exported):
    model = reference_model(exported["run"], exported["cfg"])
    sess = session(exported["onnx"])
    outputs = []
    for n, seed in ((1, 11), (3, 12), (17, 13)):
        x = normalized(pixels(n, seed))
        got = sess.run(["embedding"], {"input": x})[0]
        want = oneflow_forward(model, x)
        assert got.shape == want.shape == (n, 32)
        diff = np.abs(got - want).max()
        assert diff < 1e-4, f"batch {n}: max abs diff {diff}"
        outputs.append(want)
    # Not a degenerate model: different images give clearly different embeddings.
    assert np.abs(outputs[2][0] - outputs[2][1]).max() > 0.05 * np.abs(outputs[2]).max()
    # The export's own check covered the same batch sizes and reported the differences.
    assert sorted(exported["info"]["max_abs_diff"]) == [1, 3, 17]
    assert max(exported["info"]["max_abs_diff"].values()) < 1e-4
    assert "batch 17" in exported["script_out"]


def test_batch_rows_are_independent(exported):
    """A row's embedding must not depend on what else is in the batch (no baked batch size)."""
    sess = session(exported["onnx"])
    x = normalized(pixels(17, 21))
    full = sess.run(["embedding"], {"input": x})[0]
    single = np.concatenate([sess.run(["embedding"], {"input": x[i:i + 1]})[0] for i in (0, 8, 16)])
    np.testing.assert_allclose(single, full[[0, 8, 16]], atol=1e-5)


def test_names_shapes_and_dynamic_batch(exported):
    m = onnx.load(str(exported["onnx"]))
    onnx.checker.check_model(m)
    assert [i.name for i in m.graph.input] == ["input"]
    assert [o.name for o in m.graph.output] == ["embedding"]

    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    assert dims(m.graph.input[0]) == ["N", 3, 112, 112]
    assert dims(m.graph.output[0]) == ["N", 32]
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert {o.domain or "ai.onnx": o.version for o in m.opset_import}["ai.onnx"] == 11
    # FP32 weights only.
    assert all(t.data_type == onnx.TensorProto.FLOAT for t in m.graph.initializer if t.dims and len(t.dims) > 1)
    baked = onnx.load(str(exported["baked"]))
    assert {o.domain or "ai.onnx": o.version for o in baked.opset_import}["ai.onnx"] == 13
    assert [i.name for i in baked.graph.input] == ["input"] and [o.name for o in baked.graph.output] == ["embedding"]


def test_baked_normalization_equals_outside_normalization(exported):
    plain, baked = session(exported["onnx"]), session(exported["baked"])
    px = pixels(3, 31)
    want = plain.run(["embedding"], {"input": normalized(px)})[0]
    got = baked.run(["embedding"], {"input": px.astype(np.float32)})[0]
    np.testing.assert_allclose(got, want, atol=1e-5)
    # and the baked model really expects raw pixels: normalised input gives something else
    other = baked.run(["embedding"], {"input": normalized(px)})[0]
    assert np.abs(other - want).max() > 1e-2


def test_checkpoint_embedder_matches_oneflow_and_onnx(exported):
    from of_face.eval.checkpoint_embedder import CheckpointEmbedder

    embed = CheckpointEmbedder(exported["run"])
    px = pixels(5, 41)
    got = embed(np.ascontiguousarray(px.transpose(0, 2, 3, 1)))  # NHWC uint8, as evaluations pass
    assert got.dtype == np.float32 and got.shape == (5, 32)
    model = reference_model(exported["run"], exported["cfg"])
    np.testing.assert_allclose(got, oneflow_forward(model, normalized(px)), atol=1e-5)
    onnx_out = session(exported["onnx"]).run(["embedding"], {"input": normalized(px)})[0]
    np.testing.assert_allclose(got, onnx_out, atol=1e-4)
    # a backbone.npz path with an explicit config works too
    embed2 = CheckpointEmbedder(exported["run"] / "backbone.npz", config=exported["run"] / "config.yaml")
    np.testing.assert_allclose(embed2(px.transpose(0, 2, 3, 1)), got, atol=1e-6)


def test_exported_models_embed_like_the_checkpoint(exported):
    """The evaluation path: OnnxEmbedder on either export == CheckpointEmbedder (uint8 NHWC in).
    The baked export is recognised from its metadata, so no --mean/--std is needed for it."""
    import argparse

    from of_face.eval.checkpoint_embedder import CheckpointEmbedder
    from of_face.eval.embedders import embedder_from_args as make_embedder

    images = np.ascontiguousarray(pixels(4, 61).transpose(0, 2, 3, 1))
    want = CheckpointEmbedder(exported["run"])(images)
    for path in (exported["onnx"], exported["baked"]):
        args = argparse.Namespace(model=str(path), checkpoint=None, mean=None, std=None, threads=None)
        np.testing.assert_allclose(make_embedder(args)(images), want, atol=1e-4)


def test_corrupted_checkpoint_leaves_no_file(exported, tmp_path):
    from of_face.export import export_onnx

    bad = tmp_path / "bad"
    shutil.copytree(exported["run"], bad)
    data = (bad / "backbone.npz").read_bytes()
    (bad / "backbone.npz").write_bytes(data[: len(data) // 2])  # a cut write
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(ValueError, match="backbone.npz"):
        export_onnx(bad, out_dir / "model.onnx")
    assert list(out_dir.iterdir()) == []
    # A checkpoint that does not fit its config fails the same way.
    wrong = tmp_path / "wrong"
    shutil.copytree(exported["run"], wrong)
    cfg = load_config(None, TINY[:-1] + ["Model.embedding_size=16"])
    save_config(cfg, str(wrong / "config.yaml"))
    with pytest.raises(ValueError, match="does not match"):
        export_onnx(wrong, out_dir / "model.onnx")
    assert list(out_dir.iterdir()) == []
    # The CLI reports it with exit status 2 (a refused input) and no file either.
    from of_face.export import main

    assert main(["--checkpoint", str(bad), "--out", str(out_dir / "cli.onnx")]) == 2
    assert list(out_dir.iterdir()) == []


def test_parity_failure_is_reported_and_nothing_written(exported, tmp_path, monkeypatch):
    """If ONNX and OneFlow disagree, the export fails with the difference and writes nothing."""
    import of_face.export as ex

    real = ex._oneflow_embed
    monkeypatch.setattr(ex, "_oneflow_embed", lambda model, x: real(model, x) + 0.05)
    with pytest.raises(ex.ExportError, match=r"differ at batch 2: max abs diff 0.05 > tolerance 0.0001"):
        ex.export_onnx(exported["run"], tmp_path / "model.onnx", batch_for_check=(2,))
    assert list(tmp_path.iterdir()) == []


OTHER_BACKBONES = {
    # FaceViT needs opset >= 13: OneFlow lowers LayerNorm on CPU to a `var` op that oneflow-onnx
    # converts only from opset 13.
    "face_vit_tiny": (["Model.name=vit_t", "Model.vit_dim=32", "Model.vit_depth=2", "Model.embedding_size=32"], 13),
    "mobilefacenet_tiny": (
        ["Model.name=mbf", "Model.layers=[1,1,1,1]", "Model.width=8", "Model.embedding_size=32"], 11),
}


@pytest.mark.parametrize("name", sorted(OTHER_BACKBONES))
def test_other_backbones_parity(name, tmp_path):
    """FaceViT (attention reshapes/slices, LayerNorm, ReLU6) and MobileFaceNet export with a
    dynamic batch and match OneFlow eager."""
    from of_face.models import MODELS

    from of_face.export import ExportError, export_onnx

    overrides, opset = OTHER_BACKBONES[name]
    if overrides[0].split("=")[1] not in MODELS:
        pytest.skip(f"{name} is not in this checkout")
    run = tmp_path / "run"
    cfg = make_run(str(run), overrides, seed=5)
    info = export_onnx(run, tmp_path / "m.onnx", opset=opset)
    model = reference_model(str(run), cfg)
    sess = session(tmp_path / "m.onnx")
    for n, seed in ((1, 51), (3, 52), (17, 53)):
        x = normalized(pixels(n, seed))
        got = sess.run(["embedding"], {"input": x})[0]
        want = oneflow_forward(model, x)
        assert got.shape == want.shape == (n, 32)
        assert np.abs(got - want).max() < 1e-4, f"{name} batch {n}"
    # images give clearly different embeddings, so the 1e-4 agreement is not about a constant
    assert np.abs(want[0] - want[1]).max() > 0.05 * np.abs(want).max()
    assert max(info["max_abs_diff"].values()) < 1e-4
    if name == "face_vit_tiny":
        with pytest.raises(ExportError, match="opset 13"):
            export_onnx(run, tmp_path / "m11.onnx", opset=11)
        assert not (tmp_path / "m11.onnx").exists()
