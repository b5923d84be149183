"""Checkpoints and resume through the real CLI.

- kill -9 mid-run, `Global.resume=auto` to the end: the final checkpoint (backbone, FC, momentum
  of both, step counter, every rank's copy of replicated tensors) and backbone.npz are
  bit-identical to an unbroken run, graph and eager mode on 2 CPU ranks.
- a checkpoint moves 2 ranks -> 1 rank -> 2 ranks: the FC weight and its momentum are stored
  unpadded and re-split (13 classes: padded to 14 on 2 ranks), the data order continues at the
  same sample; the next step's loss equals the unmoved run's to 1e-5.
- Global.pretrained: the weights arrive; a file of another architecture is refused by name.
"""
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from conftest import REPO, losses, tiny, train, train_cmd
from of_face.heads import fc_table

STEPS, KILL_AT = 40, 20


@pytest.fixture(scope="module")
def faces(synthetic_faces):
    """12 identities x 10 images: 15 global batches of 8 per epoch (so step 20 is mid-epoch 1)."""
    return synthetic_faces(12, 10)


def arrays(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files if k != "__meta__"}


def assert_identical(a, b):
    a, b = arrays(a), arrays(b)
    assert a.keys() == b.keys()
    differ = [k for k in a if a[k].shape != b[k].shape or a[k].tobytes() != b[k].tobytes()]
    assert not differ, f"{len(differ)} of {len(a)} arrays differ, e.g. {differ[:5]}"
    return a


def checkpoints(out):
    return sorted(p.name for p in out.glob("ckpt-*.npz"))


# eager: `make test-all` only; an eager resume is bit-identical in test_partial_fc_sampling_resumes_exactly
@pytest.mark.parametrize("mode,nproc", [("graph", 2), pytest.param("eager", 2, marks=pytest.mark.slow)])
def test_kill_and_resume_is_bit_identical(tmp_path, faces, mode, nproc):
    batch = 8 // nproc
    common = [f"Global.mode={mode}", f"Data.batch_size={batch}", "Global.epochs=3",
              f"Global.max_steps={STEPS}", "Global.save_interval=5", "Global.keep_checkpoints=3",
              "Global.log_interval=5"]
    t0 = time.time()
    straight = tmp_path / "straight"
    train(tiny(faces, straight, *common), nproc)
    t_straight = time.time() - t0

    # the same run, killed (SIGKILL to the launcher's whole process group) once ckpt 20 exists
    broken = tmp_path / "broken"
    log = open(tmp_path / "broken.log", "w")
    proc = subprocess.Popen(train_cmd(tiny(faces, broken, *common), nproc), cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 400
    try:
        while not (broken / f"ckpt-{KILL_AT:08d}.npz").exists():
            assert proc.poll() is None, (tmp_path / "broken.log").read_text()[-3000:]
            assert time.time() < deadline, "no step-20 checkpoint in time"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    left = checkpoints(broken)
    assert left and left[-1] < f"ckpt-{STEPS:08d}.npz", f"the run was not interrupted: {left}"

    t1 = time.time()
    out = train(tiny(faces, broken, *common, "Global.resume=auto"), nproc).text
    t_resume = time.time() - t1
    newest = left[-1]
    assert f"resumed from {broken / newest}: step {int(newest[5:13])}" in out
    final = assert_identical(straight / f"ckpt-{STEPS:08d}.npz", broken / f"ckpt-{STEPS:08d}.npz")
    assert_identical(straight / "backbone.npz", broken / "backbone.npz")
    assert int(final["__step__"]) == STEPS and final["model/head.weight"].shape == (12, 32)
    assert [k for k in final if k.startswith("opt/head.weight/")] == ["opt/head.weight/momentum_buf"]
    # the newest Global.keep_checkpoints remain; a temp file of the killed write is gone
    assert checkpoints(broken) == [f"ckpt-{s:08d}.npz" for s in (30, 35, 40)]
    assert not [p for p in broken.iterdir() if ".tmp" in p.name]
    print(f"{mode}/{nproc} rank(s): straight {t_straight:.0f}s, resume {newest} -> {STEPS}: {t_resume:.0f}s")


def test_checkpoint_moves_between_world_sizes(tmp_path_factory, synthetic_faces):
    # 13 classes: padded to 14 on 2 ranks (one padding row), 13 on 1 rank
    root = synthetic_faces(13, 8)
    tmp = tmp_path_factory.mktemp("moves")
    common = ["Global.max_steps=8", "Global.save_interval=2", "Global.keep_checkpoints=0", "Global.log_interval=1",
              "Loss.sample_rate=1.0"]
    worker = "tests/workers/train_frozen_bn.py"  # BatchNorm statistics frozen: the loss ignores the split
    ref, one, two = tmp / "ref", tmp / "one", tmp / "two"
    train(tiny(root, ref, *common, "Data.batch_size=4"), 2, worker)
    out = train(tiny(root, one, *common, "Data.batch_size=8", f"Global.resume={ref / 'ckpt-00000004.npz'}"), 1,
                worker).text
    assert "saved on 2 rank(s)" in out
    train(tiny(root, two, *common, "Data.batch_size=4", f"Global.resume={one / 'ckpt-00000006.npz'}"), 2, worker)
    a, b, c = losses(ref), losses(one), losses(two)
    assert sorted(b) == [5, 6, 7, 8] and sorted(c) == [7, 8]
    assert abs(b[5] - a[5]) <= 1e-5, (a, b)  # first step after 2 -> 1
    assert abs(c[7] - a[7]) <= 1e-5, (a, c)  # first step after 1 -> 2
    for s in b:
        assert abs(b[s] - a[s]) <= 1e-4, (s, a, b)
    with np.load(one / "ckpt-00000006.npz") as f:
        assert f["model/head.weight"].shape == (13, 32) and f["opt/head.weight/momentum_buf"].shape == (13, 32)


def test_pretrained_backbone_arrives_and_another_architecture_is_refused(tmp_path, faces):
    import oneflow as flow

    from of_face import parallel
    from of_face.config import ConfigError, ModelCfg, load_config
    from of_face.models import build_backbone
    from of_face.train.trainer import Trainer

    model = ModelCfg(name="iresnet", layers=[1, 1, 1, 1], width=8, embedding_size=32)
    rng = np.random.default_rng(5)
    state = {k: (rng.standard_normal(v.shape) * 0.1).astype(v.numpy().dtype)
             for k, v in build_backbone(model).state_dict().items()}
    path = tmp_path / "pretrained.npz"
    np.savez(path, **state)
    cfg = load_config(REPO / "configs/default.yaml",
                      tiny(faces, tmp_path / "run", "Data.batch_size=8", f"Global.pretrained={path}"))
    trainer = Trainer(cfg)
    for k, v in trainer.backbone.state_dict().items():
        np.testing.assert_array_equal(parallel.to_numpy(v), state[k], err_msg=k)
    assert fc_table.rows(trainer.head.weight).shape == (12, 32)  # a new FC for the new data set
    flow._oneflow_internal.eager.Sync()

    wider = load_config(REPO / "configs/default.yaml",
                        tiny(faces, tmp_path / "run2", "Data.batch_size=8", f"Global.pretrained={path}",
                             "Model.width=16"))
    with pytest.raises(ConfigError, match=r"Global.pretrained: .*pretrained.npz: does not match the configured "
                                          r"backbone .*shape mismatch \['conv1.weight'"):
        Trainer(wider)


def test_amp_loss_scale_and_step_counter_resume(tmp_path, faces):
    """Graph mode with AMP: the dynamic loss scale and its good-step counter come back too."""
    common = ["Data.batch_size=4", "Global.max_steps=8", "Global.save_interval=4", "Global.keep_checkpoints=0",
              "AMP.enable=true", "AMP.init_scale=1024"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(tiny(faces, straight, *common), 2)
    train(tiny(faces, resumed, *common, f"Global.resume={straight / 'ckpt-00000004.npz'}"), 2)
    final = assert_identical(straight / "ckpt-00000008.npz", resumed / "ckpt-00000008.npz")
    graph_vars = {k for k in final if k.startswith("graph/")}
    assert graph_vars == {"graph/System-Train-TrainStep", "graph/System-Train-DynamicLossScale-{graph}-LossScale",
                          "graph/System-Train-DynamicLossScale-{graph}-GoodStepCounter"}
    assert int(final["graph/System-Train-TrainStep"][0]) == 8


def test_interrupted_write_leaves_previous_checkpoint(tmp_path, faces, monkeypatch):
    """A failure while writing ckpt N keeps ckpt N-1 byte-identical, adds nothing, leaves no temp
    file; a temp file left by a killed run is removed at the next start."""
    from of_face.run import checkpoint
    from of_face.run.folder import RunFolder
    from of_face.config import load_config
    from of_face.train.trainer import Trainer

    out = tmp_path / "run"
    cfg = load_config(REPO / "configs/default.yaml", tiny(faces, out, "Data.batch_size=8", "Global.mode=eager"))
    trainer = Trainer(cfg)
    first = trainer.save_checkpoint(1, 0, 1)
    before = open(first, "rb").read()

    def dies_mid_write(fh, **arrays):
        fh.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.np, "savez", dies_mid_write)
    with pytest.raises(OSError, match="No space left"):
        trainer.save_checkpoint(2, 0, 2)
    monkeypatch.undo()
    assert open(first, "rb").read() == before
    assert sorted(p.name for p in out.iterdir() if "ckpt" in p.name) == ["ckpt-00000001.npz"]
    assert RunFolder(out).latest() == first

    (out / ".ckpt-00000002.npz.tmp4242").write_bytes(b"left by kill -9")
    Trainer(cfg)
    assert not [p for p in out.iterdir() if ".tmp" in p.name]

    # Global.resume=auto: the newest *readable* checkpoint; none at all -> start from scratch
    (out / "ckpt-00000009.npz").write_bytes(before[: len(before) // 2])
    notes = []
    assert RunFolder(str(out), notes.append).resolve_resume("auto") == first
    assert "ckpt-00000009.npz: unreadable or truncated checkpoint" in notes[0]
    assert RunFolder(str(tmp_path / "empty"), notes.append).resolve_resume("auto") is None
    assert RunFolder(str(out)).resolve_resume(None) is None


@pytest.mark.parametrize("mode,nproc", [("graph", 2), ("eager", 1)])
def test_partial_fc_sampling_resumes_exactly(tmp_path_factory, synthetic_faces, mode, nproc):
    """Loss.sample_rate < 1: the negatives' scores come from (seed, step, rank) on the host, and
    the stepper's step count comes back from the checkpoint, so the resumed run samples the same
    centres as the unbroken one."""
    root = synthetic_faces(40, 3)
    tmp = tmp_path_factory.mktemp(f"pfc_{mode}")
    common = [f"Global.mode={mode}", f"Data.batch_size={8 // nproc}", "Global.max_steps=6", "Global.save_interval=3",
              "Global.keep_checkpoints=0", "Loss.sample_rate=0.1"]  # 20 or 40 centres per rank, 8 kept
    train(tiny(root, tmp / "straight", *common), nproc)
    train(tiny(root, tmp / "resumed", *common, f"Global.resume={tmp / 'straight' / 'ckpt-00000003.npz'}"), nproc)
    assert_identical(tmp / "straight" / "ckpt-00000006.npz", tmp / "resumed" / "ckpt-00000006.npz")
