"""A checkpoint that cannot be written (disk full) stops the run on every rank with one line
naming the file and the last good checkpoint; that checkpoint stays intact and resumes.
Through the real 2-rank launcher, under a timeout: a rank left waiting would hang the test."""
import pytest

from conftest import REPO, tiny, train
from of_face.run.folder import RunFolder


@pytest.fixture(scope="module")
def faces(synthetic_faces):
    return synthetic_faces(8, 4)


def overrides(root, out, *extra):
    return tiny(root, out, "Global.mode=eager", "Data.batch_size=4", "Global.log_interval=1",
                "Global.keep_checkpoints=0", "Global.epochs=20", "Global.max_steps=6", "Global.save_interval=2",
                *extra)


@pytest.mark.parametrize("fmt,rank", [("npz", 0), ("sharded", 1)])
def test_disk_full_while_checkpointing_stops_every_rank_and_keeps_the_last_checkpoint(tmp_path, faces, fmt, rank):
    out = tmp_path / "run"
    ext = ".npz" if fmt == "npz" else ""
    args = overrides(faces, out, f"Global.checkpoint_format={fmt}")
    ran = train(args, 2, "tests/workers/train_enospc.py", ("4", rank), check=False, timeout=400)
    rc, text = ran.returncode, ran.text
    where = f" on rank {rank}" if rank else ""
    want = (f"error: could not write checkpoint {out / ('ckpt-00000004' + ext)} (No space left on device{where}); "
            f"the run stops. Last good checkpoint: {out / ('ckpt-00000002' + ext)}")
    assert rc != 0, text[-4000:]  # the rank's 1 (a runtime failure)
    # every rank stops with the same line; under oneflow's launcher each prints it, of_face's
    # launcher prints it once (tests/test_launch_failures.py)
    assert 1 <= text.count(want) <= 2, text[-4000:]
    assert f"File \"{REPO / 'of_face'}" not in text, text[-4000:]  # no traceback of a rank
    assert sorted(p.name for p in out.iterdir() if "ckpt" in p.name) == [f"ckpt-00000002{ext}"]
    assert RunFolder(str(out)).latest() == str(out / f"ckpt-00000002{ext}")

    # the kept checkpoint is whole: the run continues from it to the end
    ran = train(args + ["Global.resume=auto"], 2, check=False, timeout=400)
    rc, text = ran.returncode, ran.text
    assert rc == 0, text[-4000:]
    assert f"resumed from {out / ('ckpt-00000002' + ext)}: step 2" in text
    assert (out / f"ckpt-00000006{ext}").exists()


def test_auto_format_shards_a_large_fc_only():
    from types import SimpleNamespace

    from of_face.run.shards import SHARDED_FROM_BYTES, resolve_format

    def head(classes, dim):
        return SimpleNamespace(num_classes=classes, weight=SimpleNamespace(shape=(classes, dim)))

    assert resolve_format("auto", head(93_431, 512)) == "npz"  # MS1MV3: 0.18 GiB
    assert resolve_format("auto", head(2_059_906, 512)) == "sharded"  # WebFace42M: 3.9 GiB
    assert resolve_format("auto", head(SHARDED_FROM_BYTES // (4 * 128), 128)) == "sharded"
    assert resolve_format("auto", head(SHARDED_FROM_BYTES // (4 * 128) - 1, 128)) == "npz"
    assert resolve_format("npz", head(10_000_000, 512)) == "npz"  # an explicit setting wins
    assert resolve_format("sharded", head(10, 8)) == "sharded"
