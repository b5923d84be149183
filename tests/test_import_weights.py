"""Importing insightface / arcface_torch weights (of_face/models/interop.py, import_pth.py, import_onnx.py).

Reference: ../shared/interop/arcface_torch_mbf, made with arcface_torch itself (its README): the
embeddings of the 64 eval images (records 1..64 of glint14, (x/255 - 0.5)/0.5, no flip) from the
fresh model (eval_embeddings.npy; its ONNX export is batch-1, BN folded) and from the trained one
(backbone_after.pth -> eval_embeddings_after.npy).
"""
import io
import json
import os
import pickle
import sys
import types
import zipfile

import numpy as np
import pytest

from conftest import SHARED, need
from of_face.models import MODELS
from of_face.models.import_pth import WeightsFileError, flat_state_dict, read_pth
from of_face.models.interop import import_state, of_face_name

FIX = SHARED / "interop" / "arcface_torch_mbf"
GLINT = SHARED / "data" / "glint14"


@pytest.fixture(scope="module")
def eval_images():
    need(FIX / "eval_inputs.txt", GLINT / "train.rec")
    from of_face.data.recordio import RecordDataset

    ds = RecordDataset(str(GLINT))
    records = [int(r) for r in (FIX / "eval_inputs.txt").read_text().split()]
    return np.stack([ds[r - 1][0] for r in records])  # record r is image index r - 1 (header = record 0)


def _embed_imported(src, tmp_path, eval_images):
    from of_face.cli import import_main
    from of_face.eval.embedders import make_embedder

    out = tmp_path / "backbone.npz"
    assert import_main([str(src), "--model", "mbf", "--out", str(out)]) == 0
    return make_embedder(checkpoint=str(out))(eval_images)


def _assert_close(emb, ref):
    emb, ref = emb.astype(np.float64), ref.astype(np.float64)
    cos = (emb * ref).sum(1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() >= 0.99999, cos.min()
    assert np.abs(emb - ref).max() <= 1e-4 * np.abs(ref).max(), np.abs(emb - ref).max() / np.abs(ref).max()


def test_trained_pth_embeds_like_arcface_torch(tmp_path, eval_images):
    need(FIX / "backbone_after.pth")
    _assert_close(_embed_imported(FIX / "backbone_after.pth", tmp_path, eval_images),
                  np.load(FIX / "eval_embeddings_after.npy"))


def test_folded_batch1_onnx_embeds_like_arcface_torch(tmp_path, eval_images):
    need(FIX / "backbone.onnx")
    _assert_close(_embed_imported(FIX / "backbone.onnx", tmp_path, eval_images),
                  np.load(FIX / "eval_embeddings.npy"))


def test_pth_reader_values_match_recorded_norms():
    """Every tensor's float64 L2 norm equals the one torch recorded (trajectory.json), in state-dict order."""
    need(FIX / "backbone_after.pth")
    state = flat_state_dict(read_pth(str(FIX / "backbone_after.pth")), "x")
    recorded = json.loads((FIX / "trajectory.json").read_text())["final"]["state_dict_l2"]
    assert list(state) == list(recorded)
    for name, rec in recorded.items():
        assert list(state[name].shape) == rec["shape"] and str(state[name].dtype) == rec["dtype"], name
        assert np.linalg.norm(state[name].astype(np.float64)) == pytest.approx(rec["l2"], rel=1e-12, abs=1e-12)


def test_mismatch_names_first_tensor_and_both_shapes():
    need(FIX / "backbone.pth")
    with pytest.raises(WeightsFileError) as e:
        import_state(str(FIX / "backbone.pth"), MODELS["mbf"](width=32))
    msg = str(e.value)
    assert "\n" not in msg and "'layers.0.layers.0.weight'" in msg
    assert "[128, 3, 3, 3]" in msg and "[64, 3, 3, 3]" in msg
    with pytest.raises(WeightsFileError, match=r"features.2.weight.*\[512, 512\].*\[128, 512\]"):
        import_state(str(FIX / "backbone.onnx"), MODELS["mbf"](embedding_size=128))


# ----------------------------------------------------------------------------- hostile / damaged files


def _zip_pth(path, pickle_bytes):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle_bytes)
        zf.writestr("archive/version", "3\n")


def _hostile_pth(path, marker):
    """A .pth whose pickle would run `touch marker` if unpickled without restriction."""
    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    _zip_pth(path, pickle.dumps({"w": Evil()}, protocol=2))


def test_hostile_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran"
    bad = tmp_path / "evil.pth"
    _hostile_pth(bad, marker)
    with pytest.raises(WeightsFileError) as e:
        read_pth(str(bad))
    assert "system" in str(e.value) and str(bad) in str(e.value) and "refusing pickle global" in str(e.value)
    assert not marker.exists()


def test_tensor_reading_past_its_storage_is_refused(tmp_path, monkeypatch):
    """A crafted stride/size that would read beyond the raw storage: refused, not read."""
    fake = types.ModuleType("torch._utils")
    fake._rebuild_tensor_v2 = lambda *a: None
    torch_mod = types.ModuleType("torch")

    class FloatStorage:
        pass

    FloatStorage.__module__, FloatStorage.__qualname__ = "torch", "FloatStorage"
    torch_mod.FloatStorage, torch_mod._utils = FloatStorage, fake
    fake._rebuild_tensor_v2.__module__, fake._rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    monkeypatch.setitem(sys.modules, "torch", torch_mod)
    monkeypatch.setitem(sys.modules, "torch._utils", fake)

    class Tensor:
        def __reduce__(self):
            return fake._rebuild_tensor_v2, (Storage(), 0, (1000,), (1,), False, None)

    class Storage:
        pass

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", FloatStorage, "0", "cpu", 4) if isinstance(obj, Storage) else None

    buf = io.BytesIO()
    P(buf, protocol=2).dump({"w": Tensor()})
    bad = tmp_path / "oob.pth"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("archive/data.pkl", buf.getvalue())
        zf.writestr("archive/data/0", np.zeros(4, np.float32).tobytes())
    with pytest.raises(WeightsFileError, match="reads past its storage"):
        read_pth(str(bad))


@pytest.mark.parametrize("name", ["backbone.pth", "backbone.onnx"])
def test_truncated_file_one_line(tmp_path, capsys, name):
    need(FIX / name)
    from of_face.cli import import_main

    cut = tmp_path / name
    data = (FIX / name).read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out.npz"
    assert import_main([str(cut), "--model", "mbf", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(cut) in err and ("truncated" in err or "damaged" in err), err
    assert not out.exists()


# ----------------------------------------------------------------------------- name mapping


def arcface_mbf_names(blocks):
    """arcface_torch MobileFaceNet's parameter owners (backbones/mobilefacenet.py, transcribed)."""
    conv, lin = ["layers.0.weight", "layers.1.*", "layers.2.weight"], ["layers.0.weight", "layers.1.*"]
    dw = [f"layers.{j}.{n}" for j, unit in enumerate((conv, conv, lin)) for n in unit]
    names = [f"layers.0.{n}" for n in conv]
    names += [f"layers.1.{n}" for n in conv] if blocks[0] == 1 else \
        [f"layers.1.layers.{i}.{n}" for i in range(blocks[0]) for n in dw]
    for t, b in zip((2, 4, 6), blocks[1:]):
        names += [f"layers.{t}.{n}" for n in dw] + [f"layers.{t + 1}.layers.{i}.{n}" for i in range(b) for n in dw]
    names += [f"conv_sep.{n}" for n in conv] + [f"features.layers.0.{n}" for n in lin]
    names += ["features.layers.2.weight", "features.layers.3.*"]
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    return [n[:-1] + b if n.endswith("*") else n for n in names for b in (bn if n.endswith("*") else ("",))]


def arcface_vit_names(depth):
    block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias", "norm2.weight",
             "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    return (["pos_embed", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias"]
            + [f"blocks.{i}.{n}" for i in range(depth) for n in block] + ["norm.weight", "norm.bias"]
            + ["feature.0.weight"] + [f"feature.1.{b}" for b in bn]
            + ["feature.2.weight"] + [f"feature.3.{b}" for b in bn])


def arcface_iresnet_names(layers):
    """arcface_torch IResNet's state-dict names (backbones/iresnet.py, transcribed)."""
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    names = ["conv1.weight"] + [f"bn1.{b}" for b in bn] + ["prelu.weight"]
    for s, blocks in enumerate(layers, 1):
        for i in range(blocks):
            p = f"layer{s}.{i}."
            names += [p + f"bn1.{b}" for b in bn] + [p + "conv1.weight"] + [p + f"bn2.{b}" for b in bn]
            names += [p + "prelu.weight", p + "conv2.weight"] + [p + f"bn3.{b}" for b in bn]
            if i == 0:  # every stage starts with a stride-2 block: a 1x1 conv + BN shortcut
                names += [p + "downsample.0.weight"] + [p + f"downsample.1.{b}" for b in bn]
    return names + [f"bn2.{b}" for b in bn] + ["fc.weight", "fc.bias"] + [f"features.{b}" for b in bn]


@pytest.mark.parametrize("model,family,names", [
    ("iresnet18", "iresnet", arcface_iresnet_names((2, 2, 2, 2))),
    ("iresnet100", "iresnet", arcface_iresnet_names((3, 13, 30, 3))),
    ("mbf", "mbf", arcface_mbf_names((1, 4, 6, 2))),
    ("mbf_large", "mbf", arcface_mbf_names((2, 8, 12, 4))),
    ("vit_t", "vit", arcface_vit_names(12)),
])
def test_arcface_names_map_onto_every_of_face_tensor(model, family, names):
    own = set(MODELS[model]().state_dict())
    mapped = [of_face_name(n, family) for n in names]
    assert len(set(mapped)) == len(names) and set(mapped) == own


def test_arcface_mbf_names_transcription_matches_the_real_file():
    """The transcription above against names arcface_torch itself wrote (the fixture's mbf)."""
    need(FIX / "backbone.pth")
    assert sorted(arcface_mbf_names((1, 4, 6, 2))) == sorted(flat_state_dict(read_pth(str(FIX / "backbone.pth")), "x"))


@pytest.mark.parametrize("name", ["iresnet", "mbf"])
def test_onnx_from_another_exporter_imports_by_structure(name, tmp_path):
    """of_face's own export (oneflow-onnx) lists an IResNet block's shortcut conv before its main branch,
    folds BN into the convs, deduplicates equal initializers and names nothing like arcface_torch: the
    import must still give the original model's eval outputs."""
    import oneflow as flow

    from of_face.config import load_config, save_config
    from of_face.export import export_onnx
    from of_face.models import build_backbone
    from of_face.models.weights import write_backbone

    cfg = load_config(None, [f"Model.name={name}", "Model.layers=[1,1,1,1]", "Model.width=8",
                             "Model.embedding_size=16"])
    model = build_backbone(cfg.Model)
    rng = np.random.default_rng(0)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    for k, v in state.items():  # non-trivial BN statistics and biases, so folding matters
        if k.endswith("running_mean") or k.endswith("bias"):
            state[k] = rng.normal(0, 0.1, v.shape).astype(np.float32)
        elif k.endswith("running_var"):
            state[k] = rng.uniform(0.5, 2.0, v.shape).astype(np.float32)
    model.load_state_dict({k: flow.tensor(v) for k, v in state.items()})
    write_backbone(state, str(tmp_path / "backbone.npz"))
    save_config(cfg, str(tmp_path / "config.yaml"))
    export_onnx(str(tmp_path), str(tmp_path / "m.onnx"))

    imported = build_backbone(cfg.Model)
    imported.load_state_dict({k: flow.tensor(v) for k, v in import_state(str(tmp_path / "m.onnx"), imported).items()})
    x = flow.tensor(rng.normal(0, 1, (3, 3, 112, 112)).astype(np.float32))
    model.eval()
    imported.eval()
    with flow.no_grad():
        ref, got = model(x).numpy(), imported(x).numpy()
    _assert_close(got, ref)


def test_global_pretrained_refuses_hostile_pth_with_config_key(tmp_path):
    """Global.pretrained takes a .pth directly (the parity test trains from one); a hostile one stops
    build() with a ConfigError naming the key, the file and the global, and runs nothing."""
    from of_face.config import ConfigError, load_config
    from of_face.train.system import build

    marker = tmp_path / "ran"
    bad = tmp_path / "zoo.pth"
    _hostile_pth(bad, marker)
    cfg = load_config(None, ["Model.name=mbf", "Model.width=8", "Global.device=cpu", f"Global.pretrained={bad}"])
    with pytest.raises(ConfigError, match=r"Global.pretrained: .*zoo.pth: refusing pickle global '(posix|os).system'"):
        build(cfg, 14, total_steps=1)
    assert not marker.exists()
