"""of_face.io: the one atomic-write helper and the stale-temporary clean-up that matches it."""
import os

import pytest

from of_face.io import atomic_path, atomic_write, remove_stale_temporaries, temp_name


def test_atomic_write_replaces_the_target_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with atomic_write(target) as f:
        f.write(b"new")
        assert os.path.basename(f.name) == f".a.bin.tmp{os.getpid()}"
        assert target.read_bytes() == b"old"  # readers see the old file until the rename
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]
    with atomic_write(str(tmp_path / "t.csv"), "w", newline="") as f:
        f.write("x,y\r\n")
    assert (tmp_path / "t.csv").read_bytes() == b"x,y\r\n"


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_an_error_keeps_the_old_file_and_removes_the_temporary(tmp_path, error):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(error):
        with atomic_write(target) as f:
            f.write(b"half")
            raise error()
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]
    with pytest.raises(ValueError, match="mode"):
        with atomic_write(target, "ab"):
            pass


def test_atomic_path_for_writers_that_open_files_themselves(tmp_path):
    with atomic_path(tmp_path / "set") as tmp:
        assert tmp == temp_name(tmp_path / "set") == str(tmp_path / f".set.tmp{os.getpid()}")
        os.mkdir(tmp)  # a folder works too
        (tmp_path / f".set.tmp{os.getpid()}" / "x").write_text("1")
    assert (tmp_path / "set" / "x").read_text() == "1"
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "other") as tmp:
            os.mkdir(tmp)
            raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_remove_stale_temporaries_matches_exactly_the_scheme(tmp_path):
    stale = [".ckpt-00000002.npz.tmp4242", ".config.yaml.tmp7", ".loss.png.tmp1"]
    kept = ["ckpt-00000002.npz", "config.yaml.tmp", "notes.tmp12", ".hidden", ".x.tmpabc", "metrics.csv"]
    for name in stale + kept:
        (tmp_path / name).write_text("x")
    (tmp_path / ".dir.tmp3").mkdir()  # folders are left alone
    assert remove_stale_temporaries(tmp_path) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + [".dir.tmp3"])
    assert remove_stale_temporaries(tmp_path / "missing") == []
