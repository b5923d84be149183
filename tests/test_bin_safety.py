"""Verification `.bin` files run none of their pickle's code, and a wrong content names the file.

A `.bin` is a pickle; a crafted one names `os.system` (or any callable) and `pickle.load` calls it.
The reader (of_face/data/verification_bin.py) resolves only the numpy / latin-1 globals that
insightface's sets hold. Each hostile file here would create a marker file if any of its code ran:
the marker must not exist after the reader, after a 2-rank training run (Data.val_targets) and
after `of-face verify`, which must each end with one `error:` line naming the file and the refused
global, exit status 2, no traceback, nothing trained or written.
"""
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, SHARED, need, one_error_line, tiny, tiny_onnx
from conftest import train as conftest_train
from of_face.data.verification_bin import BinFileError, load_bin, read_bin_entries, write_bin


class _System:
    """Pickles as `os.system(<cmd>)`: the classic hostile payload."""

    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return os.system, (self.cmd,)


class _Eval:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return eval, (self.code,)


def hostile_bins(folder, marker):
    """{name: path} of .bin files that each create `marker` when unpickled by pickle.load."""
    png = _png()
    payloads = {
        "system_in_images": ([_System(f"touch {marker}"), png], [True]),
        "system_as_labels": ([png, png], _System(f"touch {marker}")),
        "eval_at_top": _Eval(f"open({str(marker)!r}, 'w').close() or ([b'', b''], [True])"),
        # an object array: its items are built by the pickle too
        "object_array": ([np.array([_System(f"touch {marker}")], dtype=object), png], [True]),
    }
    out = {}
    for name, obj in payloads.items():
        path = folder / f"{name}.bin"
        path.write_bytes(pickle.dumps(obj, protocol=4))
        out[name] = path
    # sanity: plain pickle.load really runs the payload (the test would prove nothing otherwise)
    with open(out["system_in_images"], "rb") as f:
        pickle.load(f)
    assert marker.exists()
    marker.unlink()
    return out


def _png():
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (112, 112), (90, 120, 150)).save(buf, format="PNG")
    return buf.getvalue()


def test_hostile_bins_refused_without_running(tmp_path):
    marker = tmp_path / "ran"
    for name, path in hostile_bins(tmp_path, marker).items():
        with pytest.raises(BinFileError) as e:
            load_bin(path)
        text = str(e.value)
        assert text.startswith(f"{path}: refusing"), text
        want = "builtins.eval" if name == "eval_at_top" else ("dtype object" if name == "object_array" else
                                                              "posix.system")
        assert want in text, (name, text)
        assert "\n" not in text
        assert not marker.exists(), name


@pytest.mark.parametrize("content, words", [
    ((5, [True]), ["the images are of type int"]),
    ([b"a", b"b"], ["the images are of type bytes"]),
    (([b"a", b"b"], [5]), ["label 0 is 5"]),
    (([b"a"], [True]), ["1 images for 1 pairs", "2 x pairs"]),
    (([b"a", b"b", b"c", b"d"], [True]), ["4 images for 1 pairs"]),
    (([], []), ["0 images for 0 pairs"]),
    (([np.zeros(3, np.float32)] * 2, [True]), ["dtype float32"]),
    (([b"a", b"b"], np.array([0.5])), ["dtype float64"]),
    ("just text", ["an object of type str"]),
    ({"a": 1}, ["an object of type dict"]),
])
def test_wrong_content_named(tmp_path, content, words):
    path = tmp_path / "wrong.bin"
    path.write_bytes(pickle.dumps(content, protocol=2))
    with pytest.raises(BinFileError) as e:
        read_bin_entries(path)
    assert str(e.value).startswith(f"{path}: ")
    for w in words:
        assert w in str(e.value), str(e.value)


@pytest.mark.parametrize("protocol", [2, 4])
def test_what_insightface_writes_is_read(tmp_path, protocol):
    """bytes (lfw2pack.py), cv2.imencode's uint8 [n, 1] arrays, numpy bool labels in a list or
    an array, a tuple: the same images and labels come back."""
    png = _png()
    arr = np.frombuffer(png, np.uint8).reshape(-1, 1)
    for images, labels in (([png, png, png, png], [True, False]),
                           ([arr, arr, arr, arr], [np.bool_(True), np.bool_(False)]),
                           ((png, arr, png, arr), np.array([True, False]))):
        path = tmp_path / "ok.bin"
        path.write_bytes(pickle.dumps((images, labels), protocol=protocol))
        got, issame = load_bin(path)
        assert got.shape == (4, 112, 112, 3) and issame.tolist() == [True, False]
        assert (got == np.array([90, 120, 150], np.uint8)).all()


def test_shared_bins_still_read():
    small, glint = SHARED / "data" / "small_lfw.bin", SHARED / "data" / "glint14" / "glint4_val.bin"
    need(small, glint)
    for path, pairs in ((small, 10), (glint, 1000)):
        images, issame = load_bin(path)
        assert images.shape == (2 * pairs, 112, 112, 3) and issame.shape == (pairs,)
        with open(path, "rb") as f:  # the same content as plain pickle (these files are trusted)
            bins, labels = pickle.load(f, encoding="bytes")
        assert np.asarray(labels, bool).tolist() == issame.tolist()
        from of_face.data.verification_bin import entry_bytes

        assert [entry_bytes(e) for e in read_bin_entries(path)[0]] == [entry_bytes(e) for e in bins]


# --------------------------------------------------------------------------- through the commands


@pytest.fixture
def faces(synthetic_faces):
    return synthetic_faces(12, 4)


def train(data, out, val):
    """The tiny run on 2 ranks through of_face.train.launch (what scripts/train_ddp.sh runs), validating on `val`."""
    return conftest_train(tiny(data, out, f"Data.val_targets=[{val}]", "Data.batch_size=4", "Global.max_steps=2",
                               "Global.log_interval=1"), launcher="of_face", check=False, timeout=300)


def nothing_trained(proc, out):
    assert "step 1/" not in proc.stdout
    left = [p.name for p in out.rglob("*") if p.name.startswith("ckpt-") or p.name == "backbone.npz"
            or ".tmp" in p.name] if out.exists() else []
    assert not left, left


def test_hostile_bin_in_training_runs_nothing(faces, tmp_path):
    data = tmp_path / "faces"
    shutil.copytree(faces, data)
    marker = tmp_path / "ran"
    path = hostile_bins(data, marker)["system_in_images"]
    out = tmp_path / "run"
    proc = train(data, out, path.stem)
    one_error_line(proc, 2, ["Data.val_targets", str(path), "refusing pickle global 'posix.system'"])
    assert not marker.exists()
    nothing_trained(proc, out)


def test_wrong_content_bin_in_training(faces, tmp_path):
    data = tmp_path / "faces"
    shutil.copytree(faces, data)
    (data / "five.bin").write_bytes(pickle.dumps((5, [True])))
    out = tmp_path / "run"
    proc = train(data, out, "five")
    one_error_line(proc, 2, ["Data.val_targets", str(data / "five.bin"), "the images are of type int"])
    assert "internal error" not in proc.stderr
    nothing_trained(proc, out)


def verify(model, bin_path):
    return subprocess.run([sys.executable, "-m", "of_face.cli", "verify", "--model", str(model), "--bin",
                           str(bin_path)], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_hostile_and_wrong_bins_in_verify(tmp_path):
    model = tiny_onnx(tmp_path / "m.onnx")
    marker = tmp_path / "ran"
    for name, path in hostile_bins(tmp_path, marker).items():
        proc = verify(model, path)
        one_error_line(proc, 2, [str(path), "refusing"])
        assert not marker.exists(), name
        assert proc.stdout == ""
    five = tmp_path / "five.bin"
    five.write_bytes(pickle.dumps((5, [True])))
    one_error_line(verify(model, five), 2, [str(five), "the images are of type int"])
    few = tmp_path / "few.bin"
    write_bin(few, [_png()] * 4, [True, False])
    one_error_line(verify(model, few), 2, [str(few), "2 pairs; the 10-fold protocol needs at least 10"])
    # and a good one still verifies
    good = tmp_path / "good.bin"
    write_bin(good, [_png()] * 20, [True, False] * 5)
    proc = verify(model, good)
    assert proc.returncode == 0 and "good: " in proc.stdout and "10 pairs" in proc.stdout, proc.stderr


def test_too_few_pairs_for_ten_folds_in_training(faces, tmp_path):
    out = tmp_path / "run"
    proc = train(faces, out, "synth_val")  # the fixture's set: 2 pairs
    one_error_line(proc, 2, ["Data.val_targets", str(faces / "synth_val.bin"),
                             "2 pairs; the 10-fold protocol needs at least 10"])
    nothing_trained(proc, out)
