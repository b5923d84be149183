"""Strict config reading: a key or section given twice, a non-finite number and a wrong
Global.device are refused with one message saying what to do."""
import pytest

from of_face.config import ConfigError, load_config


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_second_section_refused(tmp_path):
    path = write(tmp_path, "Global:\n  seed: 1\nModel:\n  width: 8\nGlobal:\n  mode: eager\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == (f"{path}: line 5: 'Global' is given twice (first on line 1); merge them: the later "
                            "one would silently replace the earlier")


def test_duplicate_key_in_a_section_refused(tmp_path):
    path = write(tmp_path, "Optimizer:\n  lr: 0.1\n  momentum: 0.9\n  lr: 0.01\n")
    with pytest.raises(ConfigError, match=r"line 4: 'lr' is given twice \(first on line 2\)"):
        load_config(path)


def test_same_key_in_different_sections_is_fine(tmp_path):
    cfg = load_config(write(tmp_path, "Data:\n  batch_size: 8\nGlobal:\n  seed: 3\nModel:\n  width: 8\n"))
    assert (cfg.Data.batch_size, cfg.Global.seed, cfg.Model.width) == (8, 3, 8)


@pytest.mark.parametrize("text, key, shown", [
    ("Optimizer:\n  lr: .nan\n", "Optimizer.lr", "nan"),
    ("Loss:\n  scale: .inf\n", "Loss.scale", "inf"),
    ("Loss:\n  margin: [1.0, -.inf, 0.0]\n", "Loss.margin[1]", "-inf"),
])
def test_non_finite_numbers_refused_in_files(tmp_path, text, key, shown):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    assert str(e.value) == f"{key}: expected a finite number, got {shown}"


@pytest.mark.parametrize("override", ["Optimizer.lr=nan", "AMP.init_scale=inf", "Optimizer.weight_decay=.NaN"])
def test_non_finite_numbers_refused_in_overrides(override):
    with pytest.raises(ConfigError, match=r"expected a finite number"):
        load_config(None, [override])


def test_large_finite_number_still_accepted():
    # the non-finite rule refuses nan/inf only; a key's own range check decides the rest (Loss.scale
    # refuses logits beyond float32, tests/test_config.py)
    assert load_config(None, ["Optimizer.lr=1.0e+39"]).Optimizer.lr == 1.0e39


@pytest.mark.parametrize("value, hint", [
    ("gpu", "for an NVIDIA GPU use 'cuda'"),
    ("GPU", "for an NVIDIA GPU use 'cuda'"),
    ("cuda:1", "pick GPUs with CUDA_VISIBLE_DEVICES"),
    ("mps", "OneFlow 0.9 runs on 'cpu' and NVIDIA GPUs ('cuda') only"),
    ("cpuu", "'auto' takes cuda when OneFlow sees a GPU"),
])
def test_device_values_explained(value, hint):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"Global.device={value}"])
    assert str(e.value).startswith(f"Global.device: expected one of auto, cpu, cuda, got '{value}'; ")
    assert hint in str(e.value)
    assert "did you mean 'cpu'" not in str(e.value)
