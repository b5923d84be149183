"""The CUDA code paths, tested on a CPU machine by monkeypatching what OneFlow reports.

- checkpoint RNG capture calls nothing OneFlow 0.9.0 lacks when a GPU is visible (it crashed every
  GPU run at its first checkpoint: flow.cuda.get_rng_state_all does not exist);
- the start-up check names the GPU and its compute capability and refuses what the wheel has no
  kernels for (Hopper), against an independent reading of the wheel's SASS list;
- CPU-only process settings are not applied to CUDA runs;
- scripts/train_ddp.sh starts one process per GPU that nvidia-smi lists.
"""
import os
import subprocess
import sys

import numpy as np
import oneflow as flow
import pytest

from conftest import REPO, free_port
from of_face import _libs
from of_face.config import load_config
from of_face.device import UnsupportedDevice, capability_supported, check_device
from of_face.train import rng

WHEEL_SASS = [(6, 0), (6, 1), (7, 0), (7, 5), (8, 0), (8, 6)]  # OneFlow 0.9.0 cu11x wheel, no PTX


def fake_gpu(monkeypatch, cc, name="NVIDIA Test GPU"):
    monkeypatch.setattr(flow.cuda, "is_available", lambda: True)
    monkeypatch.setattr(flow.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(flow.cuda, "get_device_capability", lambda index=None: cc)
    monkeypatch.setattr(flow.cuda, "get_device_name", lambda index=None: name)


def test_rng_capture_with_a_gpu_visible(monkeypatch):
    fake_gpu(monkeypatch, (8, 0))
    assert not hasattr(flow.cuda, "get_rng_state_all")  # the call that crashed does not exist
    np.random.seed(5)
    arrays, meta = rng.rng_states()
    expected = np.random.rand(3)
    np.random.seed(99)
    rng.set_rng_states(arrays, {"rng": meta})
    assert np.array_equal(np.random.rand(3), expected)
    assert sorted(arrays) == ["rng/flow_cpu", "rng/numpy_keys"]


def test_training_with_a_gpu_visible_checkpoints_and_saves_the_backbone(tmp_path, synthetic_faces):
    # before: every run on a CUDA machine crashed at its first checkpoint, before backbone.npz
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "tests/workers/train_gpu_visible.py", str(synthetic_faces(6, 4)), str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(out.glob("ckpt-00000001*")) and list(out.glob("ckpt-00000002*"))  # both checkpoints written
    assert (out / "backbone.npz").is_file()


def test_no_call_to_missing_cuda_rng_api():
    hits = [p for p in (REPO / "of_face").rglob("*.py") if "rng_state_all" in p.read_text()]
    assert not hits, hits


def test_supported_range_matches_the_wheel():
    # a SASS build runs on a GPU of the same major version and an equal or higher minor version
    for cc in [(major, minor) for major in range(3, 11) for minor in range(10)]:
        runs = any(m == cc[0] and n <= cc[1] for m, n in WHEEL_SASS)
        assert capability_supported(cc) == runs, cc


def test_hopper_refused_with_a_clear_message(monkeypatch):
    fake_gpu(monkeypatch, (9, 0), "NVIDIA H100 80GB HBM3")
    with pytest.raises(UnsupportedDevice) as e:
        check_device("auto")
    msg = str(e.value)
    assert msg.startswith("GPU 0 (NVIDIA H100 80GB HBM3) has compute capability 9.0, outside the supported 6.0-8.9")
    assert "Hopper" in msg


def test_supported_gpu_named_at_start(monkeypatch):
    fake_gpu(monkeypatch, (8, 6), "NVIDIA A10")
    said = []
    assert check_device("cuda", said.append) == "cuda"
    assert said == ["device: GPU 0 NVIDIA A10, compute capability 8.6 (supported 6.0-8.9)"]
    assert check_device("cpu", said.append) == "cpu" and len(said) == 1  # cpu asked: no GPU check


def test_cuda_asked_without_gpu(monkeypatch):
    monkeypatch.setattr(flow.cuda, "is_available", lambda: False)
    assert check_device("auto") == "cpu"
    with pytest.raises(UnsupportedDevice, match="OneFlow sees no CUDA GPU"):
        check_device("cuda")


def test_trainer_refuses_hopper_before_building(monkeypatch, capsys, tmp_path):
    from of_face.train import trainer

    fake_gpu(monkeypatch, (9, 0), "NVIDIA H200")
    built = []
    monkeypatch.setattr(trainer, "Trainer", lambda cfg: built.append(cfg))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = load_config(None, [f"Global.output_dir={tmp_path / 'run'}"])
    with pytest.raises(SystemExit) as e:
        trainer.run(cfg)
    assert e.value.code == 2 and not built
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: GPU 0 (NVIDIA H200) has compute capability 9.0")
    assert not (tmp_path / "run").exists()


def test_process_settings_per_device(monkeypatch):
    cpu_only = {"ONEFLOW_VM_COMPUTE_ON_WORKER_THREAD", "GLOG_minloglevel"}
    assert cpu_only <= set(_libs.process_env("cpu"))
    assert not cpu_only & set(_libs.process_env("cuda"))
    monkeypatch.setattr(_libs, "gpu_present", lambda: True)
    assert _libs.process_env("auto") == {"OF_FACE_DEVICE": "cuda"}
    monkeypatch.setattr(_libs, "gpu_present", lambda: False)
    assert _libs.process_env("auto")["OF_FACE_DEVICE"] == "cpu"
    for device, expect in (("cuda", None), ("cpu", "0")):  # what preload() leaves in a fresh process
        for key in cpu_only:
            monkeypatch.delenv(key, raising=False)
        monkeypatch.setenv("OF_FACE_DEVICE", device)
        _libs.preload()
        assert os.environ.get("ONEFLOW_VM_COMPUTE_ON_WORKER_THREAD") == expect
        assert (os.environ.get("GLOG_minloglevel") is None) == (expect is None)


def test_gpu_present_honours_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert not _libs.gpu_present()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert not _libs.gpu_present()


def test_train_ddp_counts_gpus_with_nvidia_smi(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    smi = fake / "nvidia-smi"
    smi.write_text("#!/bin/sh\n[ \"$1\" = -L ] || exit 1\n"
                   + "".join(f"echo 'GPU {i}: NVIDIA A100-SXM4-40GB (UUID: GPU-{i})'\n" for i in range(3)))
    smi.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "NPROC_PER_NODE")}
    env.update(PATH=f"{fake}:{env['PATH']}", PYTHON=sys.executable, MASTER=f"127.0.0.1:{free_port()}")
    # a config error: the launcher stops before starting any process, after the count is printed
    proc = subprocess.run(["bash", "scripts/train_ddp.sh", "-o", "Global.nope=1"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert "launching 3 process(es) on node 0 of 1" in proc.stderr, proc.stderr
    assert proc.returncode == 2
    env["CUDA_VISIBLE_DEVICES"] = "0,1"
    proc = subprocess.run(["bash", "scripts/train_ddp.sh", "-o", "Global.nope=1"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert "launching 2 process(es)" in proc.stderr
