"""Config loading: YAML + overrides, types, clear errors naming the key."""
import glob

import pytest
import yaml

from of_face.config import ConfigError, load_config, save_config
from conftest import REPO


def test_every_config_file_loads():
    files = sorted(glob.glob(str(REPO / "configs" / "*.yaml")))
    assert files
    for path in files:
        load_config(path)


def test_overrides_are_typed_yaml_values():
    cfg = load_config(REPO / "configs/default.yaml",
                      ["Loss.sample_rate=0.5", "Global.mode=eager", "Loss.margin=[1.0, 0.0, 0.4]",
                       "Optimizer.lr=1", "Global.pretrained=null"])
    assert cfg.Loss.sample_rate == 0.5 and cfg.Global.mode == "eager"
    assert cfg.Loss.margin == [1.0, 0.0, 0.4]
    assert cfg.Optimizer.lr == 1.0 and isinstance(cfg.Optimizer.lr, float)
    assert cfg.Global.pretrained is None


@pytest.mark.parametrize("override, words", [
    (["Loss.sampel_rate=0.1"], ["Loss.sampel_rate", "did you mean 'Loss.sample_rate'"]),
    (["Los.sample_rate=0.1"], ["Los", "did you mean 'Loss'"]),
    (["Loss.sample_rate=-0.1"], ["Loss.sample_rate", "(0, 1]", "-0.1"]),
    (["Data.batch_size=abc"], ["Data.batch_size", "expected int", "abc"]),
    (["Data.batch_size=1.5"], ["Data.batch_size", "expected int"]),
    (["Global.mode=graf"], ["Global.mode", "did you mean 'graph'"]),
    (["Loss.margin=[1.0, 0.5]"], ["Loss.margin", "[m1, m2, m3]"]),
    (["Global.seed"], ["Section.key=value"]),
    (["Model.name=iresnet51"], ["Model.name", "iresnet51"]),
    (["Global.mode=eager", "AMP.enable=true"], ["AMP.enable", "graph mode only"]),
])
def test_bad_values_name_the_key(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "configs/default.yaml", override)
    for w in words:
        assert w in str(e.value)


def test_unknown_key_in_file_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("Optimizer:\n  momentun: 0.9\n")
    with pytest.raises(ConfigError, match=r"Optimizer.momentun.*did you mean 'Optimizer.momentum'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_merged_config_round_trips(tmp_path):
    cfg = load_config(REPO / "configs/default.yaml", ["Optimizer.lr=0.05"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["Optimizer"]["lr"] == 0.05


def test_model_zoo_configs_build_and_run_at_reduced_class_count():
    """Each of the model-zoo configs builds its backbone and head; one loss is finite."""
    import numpy as np

    import oneflow as flow
    from of_face import parallel
    from of_face.heads import build_head
    from of_face.models import build_backbone

    zoo = sorted(glob.glob(str(REPO / "configs" / "*_1n8c_dp_mp_fp16o1.yaml")))
    assert len(zoo) == 7  # PLSC's six files and its pfc01 run (tests/test_zoo_configs.py)
    expected = {"IResNet50": 93431, "IResNet100": 2059906, "MobileFaceNet": 2059906, "FaceViT": 2059906}
    for path in zoo:
        cfg = load_config(path)
        assert cfg.Loss.num_classes == next(v for k, v in expected.items() if k in path)
        backbone = parallel.broadcast_module(build_backbone(cfg.Model))
        # batch statistics: an untrained IResNet100 in eval mode (BN running stats 0/1) overflows
        # over its 100 residual blocks, which says nothing about the config
        backbone.train()
        head = build_head(cfg, 1000, 0)  # the run's head, at 1000 classes (0: no batch bound on the sample)
        with flow.no_grad():
            emb = backbone(parallel.batch(np.random.randn(2, 3, 112, 112).astype(np.float32)))
            loss = head(emb, parallel.batch(np.array([3, 999])))
        assert tuple(emb.shape) == (2, 512) and np.isfinite(float(parallel.to_numpy(loss))), path
        expected_k = min(1000, max(int(np.ceil(cfg.Loss.sample_rate * 1000)), 0))
        assert head.num_sample == expected_k


def test_exponent_floats_without_a_dot_are_floats():
    """YAML 1.1 reads `1e-3` as a string; a float key still takes it, a non-number still fails."""
    cfg = load_config("configs/default.yaml", ["Optimizer.lr=1e-3", "Optimizer.weight_decay=5E-4"])
    assert cfg.Optimizer.lr == 0.001 and cfg.Optimizer.weight_decay == 0.0005
    with pytest.raises(ConfigError, match="Optimizer.lr"):
        load_config("configs/default.yaml", ["Optimizer.lr=fast"])


def test_a_scale_whose_logits_float32_cannot_hold_is_refused():
    with pytest.raises(ConfigError, match=r"Loss.scale: 3e\+38 makes logits up to 4.5e\+38, beyond float32"):
        load_config(None, ["Loss.scale=3e38"])
    assert load_config(None, ["Loss.scale=1e6"]).Loss.scale == 1e6  # large but representable
