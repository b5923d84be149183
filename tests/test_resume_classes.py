"""Global.allow_resume_changes=[Loss.num_classes]: a resume with more classes keeps the
checkpoint's FC rows and their optimizer state, starts the new classes' rows as a fresh run
would and trains on; without the key listed, or with fewer classes, the resume is refused with
one `error:` line. Through the real 2-rank launcher (of_face.train.launch), under a timeout.

14 classes on 2 ranks are 7 per rank, 20 are 10: the old rows also move between the ranks."""
import numpy as np
import pytest

from conftest import tiny, train

INIT_STD = 0.01  # PartialFC's N(0, 0.01) class centres


@pytest.fixture(scope="module")
def data(synthetic_faces):
    return {n: synthetic_faces(n, 4) for n in (14, 20)}


def overrides(root, out, classes, *extra):
    return tiny(root, out, "Global.mode=graph", "Data.batch_size=4", "Global.log_interval=1",
                "Global.keep_checkpoints=0", "Global.epochs=20", "Global.save_interval=2",
                f"Loss.num_classes={classes}", *extra)


def launch(args, module=None, env=None, timeout=400):
    ran = train(args, launcher="of_face", module=module, env=env, timeout=timeout, check=False)
    return ran.returncode, ran.text


def error_lines(text):
    return [line for line in text.splitlines() if line.startswith("error:")]


def test_more_classes_on_resume(tmp_path, data):
    first, grown = tmp_path / "first", tmp_path / "grown"
    rc, text = launch(overrides(data[14], first, 14, "Global.max_steps=4"))
    assert rc == 0, text[-4000:]
    ckpt = first / "ckpt-00000004.npz"
    with np.load(ckpt) as f:
        old_rows, old_momentum = f["model/head.weight"], f["opt/head.weight/momentum_buf"]
    assert old_rows.shape == (14, 32) and np.abs(old_momentum).max() > 0  # trained, with momentum

    # without the key: refused with one line naming the change and the key; nothing written
    resume = [f"Global.resume={ckpt}", "Global.max_steps=8"]
    rc, text = launch(overrides(data[20], grown, 20, *resume))
    assert rc == 2, text[-4000:]
    assert error_lines(text) == [
        f"error: {ckpt}: FC weight is [14 classes, 32] but this run has [20 classes (Loss.num_classes / the data "
        "set), 32]; to add classes, resume with Global.allow_resume_changes=[Loss.num_classes]"], text[-4000:]
    assert "Traceback" not in text and "Check failure" not in text, text[-4000:]
    assert not list(grown.glob("ckpt-*")) and not (grown / "config.yaml").exists()

    # with it: the old rows and their momentum bit-exact, the new rows a fresh run's, training on
    out = tmp_path / "resume_classes.npz"
    rc, text = launch(overrides(data[20], grown, 20, *resume, "Global.allow_resume_changes=[Loss.num_classes]"),
                      module="tests.workers.resume_classes", env={"RESUME_CLASSES_OUT": str(out)})
    assert rc == 0, text[-4000:]
    assert "resume: Loss.num_classes 14 -> 20" in text
    assert "resume: 6 new classes (14 -> 20)" in text
    r = dict(np.load(out))
    loaded, momentum, fresh = r["loaded"], r["momentum"], r["fresh"]
    assert loaded.shape == momentum.shape == fresh.shape == (20, 32)
    assert loaded[:14].tobytes() == old_rows.tobytes()
    assert momentum[:14].tobytes() == old_momentum.tobytes()
    assert not momentum[14:].any()
    # a fresh run of this config and seed draws the same centres for classes 14..19 ...
    assert loaded[14:].tobytes() == fresh[14:].tobytes()
    # ... from N(0, 0.01): 192 draws, so the sample std is within 20 % and the mean within 4 std errors
    new = loaded[14:].astype(np.float64)
    assert abs(new.std() / INIT_STD - 1) < 0.2 and abs(new.mean()) < 4 * INIT_STD / np.sqrt(new.size), new.std()
    assert np.abs(new - old_rows[:6]).min() > 0  # not the old rows again
    assert len(r["losses"]) == 4 and np.isfinite(r["losses"]).all()
    assert (r["trained"] != loaded).any(axis=1).all()  # every class row trained on, the new ones too
    with np.load(grown / "ckpt-00000008.npz") as f:
        assert f["model/head.weight"].shape == (20, 32) and f["opt/head.weight/momentum_buf"].shape == (20, 32)
        np.testing.assert_array_equal(f["model/head.weight"], r["trained"])

    # fewer classes: refused whatever is listed (the trained centres of the others would be lost)
    rc, text = launch(overrides(data[14], tmp_path / "shrunk", 14, f"Global.resume={grown / 'ckpt-00000008.npz'}",
                                "Global.max_steps=10", "Global.allow_resume_changes=[Loss.num_classes]"))
    assert rc == 2, text[-4000:]
    lines = error_lines(text)
    assert len(lines) == 1 and "FC weight is [20 classes, 32] but this run has [14 classes" in lines[0], text[-4000:]
    assert "a resume cannot remove classes" in lines[0]


def test_other_listed_changes(tmp_path, data):
    """The other keys the README lists: Optimizer.name resumes and trains (new slots at zero);
    a listed Model change that alters tensor shapes is still refused, with one line naming them."""
    first = tmp_path / "first"
    rc, text = launch(overrides(data[14], first, 14, "Global.max_steps=2"))
    assert rc == 0, text[-4000:]
    ckpt = first / "ckpt-00000002.npz"
    resume = [f"Global.resume={ckpt}", "Global.max_steps=4"]
    rc, text = launch(overrides(data[14], tmp_path / "adamw", 14, *resume, "Optimizer.name=adamw",
                                "Global.allow_resume_changes=[Optimizer.name]"))
    assert rc == 0, text[-4000:]
    with np.load(tmp_path / "adamw" / "ckpt-00000004.npz") as f:
        assert {"opt/head.weight/exp_avg", "opt/head.weight/exp_avg_sq"} <= set(f.files)
        assert not any(k.endswith("/momentum_buf") for k in f.files)
        assert int(f["graph/System-Train-TrainStep"][0]) == 4
    rc, text = launch(overrides(data[14], tmp_path / "wider", 14, *resume, "Model.width=16",
                                "Global.allow_resume_changes=[Model]"))
    assert rc == 2, text[-4000:]
    lines = error_lines(text)
    assert len(lines) == 1 and f"{ckpt}: checkpoint is for another backbone" in lines[0], text[-4000:]
    assert "shape mismatch" in lines[0] and "Traceback" not in text
