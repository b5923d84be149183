"""Sharded checkpoints (Global.checkpoint_format=sharded), through the real launcher.

- the same run saved sharded and as one file holds the same arrays, bit for bit;
- load + save with no step between, 2 -> 1 -> 2 ranks: every model, optimizer and graph array
  comes back bit-identical (13 classes: one padding row on 2 ranks, none on 1);
- training continues across world sizes: the next step's loss equals the unmoved run's;
- a rank killed while writing its shard leaves no `ckpt-*` of that step; the previous one is
  resumed and the partial folder removed; `of-face info` and export read the format.
"""
import json
import subprocess
import sys

import numpy as np
import pytest

import conftest
from conftest import REPO, losses, train


@pytest.fixture(scope="module")
def faces(synthetic_faces):
    return synthetic_faces(13, 8)  # 13 classes: padded to 14 on 2 ranks


def tiny(root, out, *extra):
    return conftest.tiny(root, out, "Global.max_steps=8", "Global.save_interval=2", "Global.keep_checkpoints=0",
                         "Global.log_interval=1", "Loss.sample_rate=1.0", "Global.checkpoint_format=sharded", *extra)


def assemble(path):
    """{key: array} of a checkpoint, either format, FC rows concatenated from the shards."""
    if path.is_dir():
        manifest = json.loads((path / "manifest.json").read_text())
        with np.load(path / "main.npz") as f:
            out = {k: f[k] for k in f.files}
        for key, files in manifest["shards"].items():
            parts = [np.load(path / name) for name, lo, hi in files]
            assert [p.shape[0] for p in parts] == [hi - lo for _, lo, hi in files]
            out[key] = np.concatenate(parts)
        return out
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def state(arrays):
    return {k: v for k, v in arrays.items() if k.split("/")[0] in ("model", "opt", "graph")}


def assert_same(a, b):
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    differ = [k for k in a if a[k].shape != b[k].shape or a[k].tobytes() != b[k].tobytes()]
    assert not differ, differ[:5]


# six launches: `make test-all` only. `make test` keeps a sharded save and resume (the next test) and a
# move between world sizes of the one-file format (test_resume.py)
@pytest.mark.slow
def test_sharded_equals_one_file_and_moves_between_world_sizes(tmp_path, faces):
    worker = "tests/workers/train_frozen_bn.py"  # BatchNorm statistics frozen: the loss ignores the split
    ref, flat = tmp_path / "ref", tmp_path / "flat"
    train(tiny(faces, ref, "Data.batch_size=4"), 2, worker)
    train(tiny(faces, flat, "Data.batch_size=4", "Global.checkpoint_format=npz"), 2, worker)
    ck = ref / "ckpt-00000008"
    assert sorted(p.name for p in ck.iterdir()) == [
        "main.npz", "manifest.json", "model.head.weight.rank0.npy", "model.head.weight.rank1.npy",
        "opt.head.weight.momentum_buf.rank0.npy", "opt.head.weight.momentum_buf.rank1.npy"]
    assert np.load(ck / "model.head.weight.rank1.npy").shape == (6, 32)  # rows 7..12, no padding row
    with np.load(ck / "main.npz") as f:
        assert not [k for k in f.files if "head.weight" in k]  # rank 0 wrote no FC row
    sharded, one_file = assemble(ck), assemble(flat / "ckpt-00000008.npz")
    assert_same(sharded, {k: v for k, v in one_file.items() if k != "__meta__"} | {"__meta__": sharded["__meta__"]})

    # load + save, no step between: 2 -> 1 -> 2 ranks, bit-identical
    one, two = tmp_path / "rt1", tmp_path / "rt2"
    # (eager: its optimizer hands back exactly the state it was given; the graph-mode run's
    # checkpoint loads into it, as tests/test_resume.py's mode changes do)
    train(tiny(faces, one, "Data.batch_size=8", "Global.mode=eager", f"Global.resume={ref / 'ckpt-00000004'}"), 1,
          "tests/workers/ckpt_roundtrip.py")
    train(tiny(faces, two, "Data.batch_size=4", "Global.mode=eager", f"Global.resume={one / 'ckpt-00000004'}"), 2,
          "tests/workers/ckpt_roundtrip.py")
    assert json.loads((one / "ckpt-00000004" / "manifest.json").read_text())["world_size"] == 1
    original = state(assemble(ref / "ckpt-00000004"))
    assert_same(state(assemble(one / "ckpt-00000004")), original)
    assert_same(state(assemble(two / "ckpt-00000004")), original)

    # training continues on another world size: 2 -> 1 (steps 5..6) -> 2 (steps 7..8)
    a, b = tmp_path / "a", tmp_path / "b"
    out = train(tiny(faces, a, "Data.batch_size=8", f"Global.resume={ref / 'ckpt-00000004'}"), 1, worker).text
    assert "saved on 2 rank(s)" in out
    train(tiny(faces, b, "Data.batch_size=4", f"Global.resume={a / 'ckpt-00000006'}"), 2, worker)
    want, got1, got2 = losses(ref), losses(a), losses(b)
    assert sorted(got1) == [5, 6, 7, 8] and sorted(got2) == [7, 8]
    for s in (5, 6, 7, 8):
        assert abs(got1[s] - want[s]) <= 1e-4, (s, want, got1)
    assert abs(got2[7] - want[7]) <= 1e-5 and abs(got2[8] - want[8]) <= 1e-4, (want, got2)

    # of-face info counts it; export reads it (the step-8 backbone = backbone.npz)
    info = subprocess.run([sys.executable, "-m", "of_face.cli", "info", str(ref)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert "saved: step 8 (ckpt-00000008)" in info.stdout, info.stdout + info.stderr
    from of_face.export import load_model

    model, _, used = load_model(ck)
    assert used == str(ck)
    with np.load(ref / "backbone.npz") as f:
        for k, v in model.state_dict().items():
            np.testing.assert_array_equal(v.numpy(), f[k], err_msg=k)


def test_a_rank_killed_between_shard_writes_leaves_the_previous_checkpoint(tmp_path, faces):
    out = tmp_path / "run"
    text = train(tiny(faces, out, "Data.batch_size=4", "Global.mode=eager"), 2, "tests/workers/train_shard_crash.py",
                 args=("4", "1"), check=False).text
    assert not (out / "ckpt-00000004").exists(), text[-3000:]
    assert (out / ".ckpt-00000004.partial").is_dir()  # what the crash left
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-00000002"]

    text = train(tiny(faces, out, "Data.batch_size=4", "Global.mode=eager", "Global.resume=auto"), 2).text
    assert f"resumed from {out / 'ckpt-00000002'}: step 2" in text
    assert "removed .ckpt-00000004.partial" in text and not (out / ".ckpt-00000004.partial").exists()
    assert sorted(p.name for p in out.glob("ckpt-*")) == [f"ckpt-{s:08d}" for s in (2, 4, 6, 8)]
