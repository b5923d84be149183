"""A failure on one rank ends the whole run: one `error:` line, the rank's exit code, nothing
half-written, through the real launcher (of_face.train.launch, what scripts/train_ddp.sh runs).

The probe's cases on 2 ranks: a corrupt record read by rank 1 only, disk full while writing a
checkpoint (the OF_FACE_FAULT_ENOSPC hook of of_face/io.py), a missing and a non-pickle val `.bin`,
an `.idx` with a wrong offset. Each must end with exit code 2 (bad input) or 1 (runtime), one
error line, no Python traceback and no native-abort noise, and no temporary or checkpoint file
left behind. The subprocess timeout catches a hang (before: 11 minutes until killed); the elapsed
times are printed (`-s`), not asserted.
"""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import conftest
from conftest import REPO, one_error_line, train_cmd
from of_face.data.loader import ShardedLoader
from of_face.data.recordio import RecordDataset

SEED = 2022  # configs/default.yaml's Global.seed: the shard plan below must match the trainer's


def tiny(root, out, *extra):
    return conftest.tiny(root, out, "Data.batch_size=4", "Global.max_steps=4", "Global.log_interval=1", *extra)


def launch(overrides, env=None, timeout=240, nproc=2):
    """of_face's own launcher (not conftest's oneflow one): (the process, seconds it took)."""
    t0 = time.time()
    proc = subprocess.run(train_cmd(overrides, nproc, launcher="of_face"), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    return proc, time.time() - t0


@pytest.fixture(scope="module")
def faces(synthetic_faces):
    return synthetic_faces(12, 4)


def copy_set(faces, dst):
    shutil.copytree(faces, dst)
    return dst


def corrupt_record(data):
    """Overwrite the image payload of a record that rank 1 (of 2) reads at step 3: rank 0 never
    sees it, so only the launcher can stop rank 0. Returns the record id."""
    ds = RecordDataset(data)
    indices, _ = ShardedLoader(ds, 4, 1, 2, seed=SEED).shard_plan(0)
    victim = int(ds.ids[indices[2][1]])
    with open(ds.rec_path, "r+b") as f:
        f.seek(ds._offsets[victim] + 8 + 24)  # record header (8) + IRHeader (24): JPEG bytes
        f.write(b"\0" * 64)
    return victim


def check_one_line(proc, code, words, out):
    """conftest's one_error_line, and nothing left of the failed run in `out`."""
    line = one_error_line(proc, code, words)
    assert "CalledProcessError" not in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-4000:]
    if out.exists():
        left = [p.name for p in out.rglob("*") if ".tmp" in p.name or p.name.startswith("ckpt-")
                or p.name == "backbone.npz"]
        assert not left, left
    return line


def test_corrupt_record_on_one_rank(faces, tmp_path):
    data = copy_set(faces, tmp_path / "faces")
    victim = corrupt_record(data)
    out = tmp_path / "run"
    proc, took = launch(tiny(data, out))
    line = check_one_line(proc, 2, [str(data / "train.rec"), f"record {victim}", "could not be decoded",
                                    "Data.skip_bad_records=true"], out)
    # it failed where planned (rank 0 prints step 1 before step 2 can run on rank 1; step 2's line
    # may or may not come before the kill)
    assert "step 1/4" in proc.stdout and "step 3/4" not in proc.stdout
    print(f"corrupt record: {took:.1f}s: {line}")


def test_corrupt_record_skipped_when_asked(faces, tmp_path):
    data = copy_set(faces, tmp_path / "faces")
    victim = corrupt_record(data)
    out = tmp_path / "run"
    proc, took = launch(tiny(data, out, "Data.skip_bad_records=true"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and f"record {victim}" in warnings[0] and "1 skipped so far" in warnings[0]
    assert (out / "backbone.npz").is_file()
    print(f"skipped record: {took:.1f}s")


def test_disk_full_while_checkpointing(faces, tmp_path):
    out = tmp_path / "run"
    proc, took = launch(tiny(faces, out, "Global.save_interval=2"), env={"OF_FACE_FAULT_ENOSPC": "ckpt-"})
    line = check_one_line(proc, 1, [str(out / "ckpt-00000002.npz"), "No space left on device",
                                    "Global.resume=auto"], out)
    print(f"disk full: {took:.1f}s: {line}")


def test_missing_val_bin(faces, tmp_path):
    out = tmp_path / "run"
    proc, took = launch([*tiny(faces, out), "Data.val_targets=[synth_val,lfw]"])
    line = check_one_line(proc, 2, ["Data.val_targets", str(faces / "lfw.bin"), "not found"], out)
    assert "step 1/4" not in proc.stdout  # refused before training
    print(f"missing val .bin: {took:.1f}s: {line}")


def test_val_bin_not_a_pickle(faces, tmp_path):
    data = copy_set(faces, tmp_path / "faces")
    (data / "junk.bin").write_text("<html>404 not found</html>\n")
    out = tmp_path / "run"
    proc, took = launch([*tiny(data, out), "Data.val_targets=[junk]"])
    line = check_one_line(proc, 2, [str(data / "junk.bin"), "not a readable verification .bin"], out)
    assert "step 1/4" not in proc.stdout
    print(f"val .bin not a pickle: {took:.1f}s: {line}")


def test_bad_idx_offset(faces, tmp_path):
    data = copy_set(faces, tmp_path / "faces")
    idx = data / "train.idx"
    lines = idx.read_text().splitlines()
    key, offset = lines[5].split("\t")
    lines[5] = f"{key}\t{int(offset) + 3}"  # points inside a record
    idx.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    proc, took = launch(tiny(data, out))
    line = check_one_line(proc, 2, [str(data / "train.rec"), f"record {key}", "RecordIO magic", "train.idx"], out)
    assert "step 1/4" not in proc.stdout
    print(f"bad .idx offset: {took:.1f}s: {line}")


def test_wrong_size_images_in_a_folder_set(tmp_path):
    import numpy as np
    from PIL import Image

    root = tmp_path / "folder"
    rng = np.random.default_rng(0)
    for k in range(4):
        (root / f"id{k}").mkdir(parents=True)
        for j in range(4):
            size = 100 if (k, j) == (2, 1) else 112  # one 100x100 image among 112x112 crops
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"id{k}" / f"{j}.png")
    out = tmp_path / "run"
    proc, took = launch([*tiny(root, out), "Data.dataset=folder", "Data.batch_size=2", "Global.max_steps=4"])
    line = check_one_line(proc, 2, [str(root / "id2" / "1.png"), "is 100x100, expected 112x112",
                                    "Data.resize=true"], out)
    print(f"100x100 image: {took:.1f}s: {line}")


def test_config_checked_once_before_any_rank(tmp_path):
    proc, took = launch(["Global.save_intervall=5"], env={"PROBE_DIR": str(tmp_path)}, timeout=60)
    assert proc.returncode == 2
    lines = (proc.stdout + proc.stderr).splitlines()
    assert [line for line in lines if "error" in line] == [
        "error: unknown config key 'Global.save_intervall'; did you mean 'Global.save_interval'?"]
    assert "launching" not in proc.stderr and "Traceback" not in proc.stderr


def _probe(tmp_path, mode):
    cmd = [sys.executable, "-m", "of_face.train.launch", "--nproc-per-node", "2", "--module",
           "tests.workers.launch_probe", "-c", "configs/default.yaml", "-o", "Global.device=cpu"]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PROBE_DIR": str(tmp_path), "PROBE_MODE": mode})


def _pids(tmp_path, timeout=60):
    t0 = time.time()
    while time.time() - t0 < timeout:
        files = [tmp_path / f"rank{r}.pid" for r in (0, 1)]
        if all(f.exists() and f.read_text() for f in files):
            return [int(f.read_text()) for f in files]
        time.sleep(0.1)
    raise AssertionError("the probe ranks did not start")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone for our purpose
        return f.read().split(")")[-1].split()[0] != "Z"


def test_rank_killed_by_a_signal_ends_the_run(tmp_path):
    launcher = _probe(tmp_path, "segv1")
    out, err = launcher.communicate(timeout=60)
    rank0, _ = _pids(tmp_path, timeout=1)
    assert launcher.returncode == 1
    assert [line for line in err.splitlines() if "error" in line] == [
        "error: rank 1 was killed by SIGSEGV (a native crash inside OneFlow, or the system's out-of-memory "
        "killer); run it again, and report it if it repeats"]
    assert not _alive(rank0)  # the sleeping rank did not outlive the run


def test_ranks_die_with_the_launcher(tmp_path):
    launcher = _probe(tmp_path, "sleep")
    pids = _pids(tmp_path)
    launcher.send_signal(signal.SIGKILL)  # no chance to clean up: PR_SET_PDEATHSIG must do it
    launcher.wait()
    t0 = time.time()
    while any(_alive(p) for p in pids) and time.time() - t0 < 10:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)


def test_exit_codes_and_lines_per_kind_of_error():
    import errno

    from of_face.config import ConfigError
    from of_face.train.errors import describe
    from of_face.train.trainer import NonFiniteLoss

    assert describe(ConfigError("Data.root: folder not found: x")) == (2, "Data.root: folder not found: x")
    assert describe(ValueError("a.rec: record 3 is truncated")) == (2, "a.rec: record 3 is truncated")
    assert describe(NonFiniteLoss("loss is nan at step 3")) == (3, "loss is nan at step 3")
    assert describe(FileNotFoundError(errno.ENOENT, "No such file or directory", "/d/x.bin")) == (
        2, "/d/x.bin: file not found")
    code, text = describe(OSError(errno.ENOSPC, "No space left on device"), "/runs/r1")
    assert code == 1 and text.startswith("/runs/r1: no space left on device; ")
    denied = OSError(errno.EACCES, "Permission denied", "/runs/r1/ckpt")
    assert describe(denied) == (1, "/runs/r1/ckpt: Permission denied")
    assert describe(RuntimeError("boom")) == (
        1, "RuntimeError: boom (an internal error; OF_FACE_DEBUG=1 prints the traceback)")
