"""A run folder belongs to one run, and no run loses another's work, through the real
launcher: a fresh run into an old run's folder, two runs into one folder, a stale lock, killing
only the launcher, a resume that changes the optimizer or the model, metrics.csv after a resume,
rotation that only deletes this run's checkpoints."""
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import conftest
from conftest import REPO, train_cmd


@pytest.fixture(scope="module")
def faces(synthetic_faces):
    return synthetic_faces(8, 4)


def tiny(root, out, *extra):
    return conftest.tiny(root, out, "Global.mode=eager", "Data.batch_size=8", "Global.log_interval=1",
                         "Global.keep_checkpoints=0", "Global.epochs=20", *extra)


def train(overrides, nproc=1, expect=0, timeout=600):
    ran = conftest.train(overrides, nproc, check=False, timeout=timeout)
    # a refusal: the rank exits 2; the launcher (oneflow.distributed.launch) reports it as 1
    ok = ran.returncode == 0 if expect == 0 else ran.returncode != 0
    assert ok, f"exit {ran.returncode}, expected {expect}:\n{ran.text[-4000:]}"
    return ran.text


def loss_steps(out):
    with open(out / "metrics.csv") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r["kind"] == "loss"]


def snapshot(out):
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and not p.name.startswith(".")}


def test_fresh_run_resume_checks_and_metrics(tmp_path, faces):
    out = tmp_path / "run"
    train(tiny(faces, out, "Global.max_steps=6", "Global.save_interval=3"))
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-00000003.npz", "ckpt-00000006.npz"]
    before = snapshot(out)

    # a fresh run into the folder: refused, nothing of the old run touched (today: trains over it)
    text = train(tiny(faces, out, "Global.max_steps=4", "Global.save_interval=2"), expect=2)
    assert f"Global.output_dir: {out} holds another run's work (ckpt-00000003.npz, ckpt-00000006.npz" in text
    assert "Global.resume=auto" in text and "Global.overwrite=true" in text
    assert snapshot(out) == before

    # resume with another optimizer: differences printed, refused, config.yaml and metrics kept
    ckpt3 = out / "ckpt-00000003.npz"
    text = train(tiny(faces, out, "Global.max_steps=6", f"Global.resume={ckpt3}", "Optimizer.name=adamw"), expect=2)
    assert "resume: Optimizer.name 'sgd' -> 'adamw'" in text
    assert "Global.allow_resume_changes=[Optimizer.name]" in text
    assert snapshot(out) == before
    text = train(tiny(faces, out, "Global.max_steps=6", f"Global.resume={ckpt3}", "Model.width=16"), expect=2)
    assert "resume: Model.width 8 -> 16" in text and snapshot(out) == before

    # an allowed change: resumes from step 3; metrics.csv holds each step once; both configs kept
    text = train(tiny(faces, out, "Global.max_steps=6", f"Global.resume={ckpt3}", "Optimizer.lr=0.05"))
    assert "resume: Optimizer.lr 0.1 -> 0.05" in text
    assert "metrics.csv: dropped 3 row(s) after step 3" in text
    assert loss_steps(out) == [1, 2, 3, 4, 5, 6]
    assert (out / "config.yaml").read_bytes() == before["config.yaml"]
    assert "lr: 0.05" in (out / "config-resume-00000003.yaml").read_text()

    # of-face info counts saved steps, not logged ones
    info = subprocess.run([sys.executable, "-m", "of_face.cli", "info", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert "saved: step 6 (ckpt-00000006.npz)" in info.stdout, info.stdout + info.stderr

    # Global.overwrite=true: the old run's files move to replaced-<time>/, the new run starts afresh
    before = snapshot(out)
    text = train(tiny(faces, out, "Global.max_steps=2", "Global.save_interval=2", "Global.overwrite=true"))
    moved = [p for p in out.iterdir() if p.name.startswith("replaced-")]
    assert len(moved) == 1 and "moved the earlier run's" in text
    assert (moved[0] / "ckpt-00000006.npz").read_bytes() == before["ckpt-00000006.npz"]
    assert (moved[0] / "config.yaml").read_bytes() == before["config.yaml"]
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-00000002.npz"]
    assert loss_steps(out) == [1, 2]


def _write_ckpt(path, run_id):
    meta = {"format": 1, "step": int(path.name[5:13]), "run_id": run_id}
    np.savez(path, __step__=np.int64(meta["step"]), __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8))


def test_rotation_only_deletes_this_runs_checkpoints(tmp_path):
    from of_face.run import checkpoint
    from of_face.run.folder import RunFolder

    for step, rid in ((10, "other"), (12, "other"), (2, "mine"), (4, "mine"), (6, "mine")):
        _write_ckpt(tmp_path / checkpoint.checkpoint_name(step), rid)
    removed = RunFolder(str(tmp_path)).rotate(1, "mine")
    assert [os.path.basename(p) for p in removed] == ["ckpt-00000002.npz", "ckpt-00000004.npz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000006.npz", "ckpt-00000010.npz",
                                                           "ckpt-00000012.npz"]


def test_a_folder_in_use_is_refused_a_stale_lock_taken_over(tmp_path, faces):
    from of_face.config import load_config
    from of_face.train.trainer import Trainer

    # this process holds the folder (a Trainer built here takes the lock); a second run is refused
    out = tmp_path / "busy"
    Trainer(load_config(REPO / "configs/default.yaml", tiny(faces, out)))
    lock = json.loads((out / ".of_face.lock").read_text())
    assert lock["pid"] == os.getpid() and lock["host"] == socket.gethostname()
    text = train(tiny(faces, out, "Global.max_steps=2"), nproc=2, expect=2)
    assert f"Global.output_dir: {out} is in use by another run (pid {os.getpid()} on host " in text
    assert not list(out.glob("ckpt-*")) and not (out / "metrics.csv").exists()

    # a lock of a dead process on this host: taken over; of another host: refused
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / ".of_face.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                                     "started": "earlier", "run_id": "x"}))
    text = train(tiny(faces, stale, "Global.max_steps=2"))
    assert f"taking over the lock of a run that is gone (pid {dead.pid}" in text
    assert (stale / "ckpt-00000002.npz").is_file() and not (stale / ".of_face.lock").exists()
    far = tmp_path / "far"
    far.mkdir()
    (far / ".of_face.lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "x"}))
    assert "is in use by another run (pid 1 on host elsewhere" in train(tiny(faces, far), expect=2)


def _children(pid):
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(d))
    return kids


def _alive(pid):
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_ranks_die_with_their_launcher(tmp_path, faces):
    out = tmp_path / "orphans"
    log = open(tmp_path / "log", "w")
    proc = subprocess.Popen(train_cmd(tiny(faces, out, "Global.max_steps=100000", "Global.epochs=10000"), 2),
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (out / "metrics.csv").exists():  # both ranks are past start-up and stepping
            assert proc.poll() is None, (tmp_path / "log").read_text()[-3000:]
            assert time.time() < deadline, "the run did not start in time"
            time.sleep(0.2)
        ranks = _children(proc.pid)
        assert len(ranks) == 2, ranks
        os.kill(proc.pid, signal.SIGKILL)  # the launcher alone
        proc.wait()
        deadline = time.time() + 30
        while any(_alive(p) for p in ranks) and time.time() < deadline:
            time.sleep(0.2)
        left = [p for p in ranks if _alive(p)]
        assert not left, f"ranks {left} outlived their launcher"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


@pytest.mark.parametrize("tail", [b"\0" * 64, b"5,loss,0.1"])
def test_resume_cuts_a_crashed_metrics_file_before_reading_it(tmp_path, tail):
    """A crash mid-append leaves NUL bytes (csv cannot read them: the resume died with an internal
    error) or a partial row (was kept as a row with a cut number): both are cut off first, then the
    rows after the resumed step."""
    from of_face.run.folder import cut_metrics
    path = tmp_path / "metrics.csv"
    rows = [f"{s},loss,{s / 10}\r\n".encode() for s in range(1, 5)]
    path.write_bytes(b"step,kind,value\r\n" + b"".join(rows) + tail)
    warned = []
    assert cut_metrics(str(path), 2, warned.append) == 2
    assert path.read_bytes() == b"step,kind,value\r\n" + rows[0] + rows[1]
    assert len(warned) == 1 and str(path) in warned[0] and "cut short at line 6" in warned[0], warned
