"""Every tool ends a failure with one `error:` line naming the file / flag / value and what was
expected, exit status 2 (input refused) or 1 (runtime), no traceback, nothing written.

Cases: `of-face export` to a read-only folder, to a path through a file, to a folder, with
`--opset 23` (all refused before the checkpoint is even read: the checkpoint given does not
exist, so the line proves the order), `embed --out` and `ijbc --result-dir` the same way;
`of-face import` with a bad file and a bad --out;
`of-face plot` on a metrics.csv with a non-number; `of-face info` on a metrics.csv cut by a crash
(NUL bytes, a partial last row: read up to the last complete row, with a warning); a YAML syntax
error on one line with its line and column (the launcher, before any rank); `scripts/train_ddp.sh`
taking relative paths from the caller's folder; an internal error still one line.
"""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, free_port, o_args, one_error_line, tiny, train
from of_face.errors import ToolError, run_command
from of_face.train.metrics import FIELDS


def tool(*args, cwd=REPO, timeout=120):
    return subprocess.run([sys.executable, "-m", "of_face.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)





def read_only_folder(tmp_path):
    """A folder no file can be created in: chmod 555, or for root (who ignores it) /sys."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() != 0:
        return folder
    try:  # root writes through chmod; /sys is read-only in containers and on most hosts
        open("/sys/of_face_probe", "w").close()
    except OSError:
        return "/sys"
    pytest.skip("no read-only folder available to root here")


@pytest.mark.parametrize("case", ["read_only", "under_a_file", "a_folder", "opset"])
def test_export_output_refused_before_any_work(tmp_path, case):
    missing = tmp_path / "no_such_run"  # read only after the output check: its error would show otherwise
    blocker = tmp_path / "file"
    blocker.write_text("x")
    args = {"read_only": [f"{read_only_folder(tmp_path)}/sub/m.onnx"],
            "under_a_file": [blocker / "sub" / "m.onnx"],
            "a_folder": [tmp_path],
            "opset": [tmp_path / "m.onnx", "--opset", "23"]}[case]
    proc = tool("export", "--checkpoint", missing, "--out", *args)
    code, words = {"read_only": (1, [str(args[0]), "cannot write in", "expected a writable folder"]),
                   "under_a_file": (2, [str(args[0]), f"{blocker} is a file, not a folder"]),
                   "a_folder": (2, [str(tmp_path), "is a folder; expected the .onnx file"]),
                   "opset": (2, ["--opset 23", "opsets 10..16"])}[case]
    one_error_line(proc, code, words)
    assert "no_such_run" not in proc.stderr and "export failed" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "ro") == ["file"]  # nothing written


def test_eval_outputs_refused_before_the_model_runs(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    missing_model = tmp_path / "no.onnx"  # read after the output check: its error would show otherwise
    proc = tool("embed", tmp_path / "a.png", "--model", missing_model, "--out", blocker / "emb.npy")
    one_error_line(proc, 2, [str(blocker / "emb.npy"), f"{blocker} is a file, not a folder"])
    proc = tool("ijbc", "--model", missing_model, "--image-path", tmp_path, "--result-dir", blocker / "res")
    one_error_line(proc, 2, ["--result-dir", f"{blocker} is a file, not a folder"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_import_errors_are_error_lines(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a zip")
    proc = tool("import", bad, "--model", "mbf", "--out", tmp_path / "out")
    one_error_line(proc, 2, [str(bad)])
    assert "of-face import:" not in proc.stderr
    proc = tool("import", tmp_path / "nope.pth", "--model", "mbf", "--out", tmp_path / "out")
    one_error_line(proc, 2, [str(tmp_path / "nope.pth"), "not found", ".pth"])
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = tool("import", bad, "--model", "mbf", "--out", blocker / "backbone.npz")
    one_error_line(proc, 2, [str(blocker), "is a file, not a folder"])
    proc = tool("import", bad, "--model", "mbf_nope", "--out", tmp_path / "out")
    one_error_line(proc, 2, ["Model.name", "mbf_nope"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pth", "file"]


# --------------------------------------------------------------------------- plot / info


def metrics_run(tmp_path, rows, tail=b""):
    run = tmp_path / "run"
    run.mkdir()
    text = ",".join(FIELDS) + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows)
    (run / "metrics.csv").write_bytes(text.encode() + tail)
    return run


def loss_row(step, value):
    return [step, "loss", value, 0, value, 0.1, "", 10.0, 5.0, 10, ""]


def test_plot_names_a_non_number(tmp_path):
    run = metrics_run(tmp_path, [loss_row(1, 2.5), loss_row(2, "abc")])
    proc = tool("plot", run)
    one_error_line(proc, 2, [str(run / "metrics.csv"), "line 3", "column value", "'abc' is not a number"])
    assert not any(p.suffix == ".png" for p in run.iterdir())


@pytest.mark.parametrize("tail, what", [(b"3,loss,2.1\0\0\0\0\0\0\0\0", "NUL bytes"),
                                        (b"\0" * 64, "NUL bytes"),
                                        (b"3,loss,2.1,0,2.", "a partial last row")])
def test_info_reads_a_metrics_csv_cut_by_a_crash(tmp_path, tail, what):
    run = metrics_run(tmp_path, [loss_row(1, 2.5), loss_row(2, 2.25)], tail)
    before = (run / "metrics.csv").read_bytes()
    proc = tool("info", run)
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: {run / 'metrics.csv'}: cut short at line 4")
    assert what in warnings[0] and "2 complete row(s)" in warnings[0]
    assert "steps: 2 / 10 done" in proc.stdout and "last loss: 2.2500" in proc.stdout
    assert (run / "metrics.csv").read_bytes() == before  # read, never repaired behind the user's back
    assert tool("plot", run).returncode == 0


@pytest.mark.parametrize("text, words", [("- Global\n- Model\n", ["expected a mapping of config sections",
                                                                        "got list ['Global', 'Model']"]),
                                          ("just a string\n", ["expected a mapping", "got str 'just a string'"]),
                                          ("Global: {}\nModel: 3\n", ["Model: expected a mapping", "got int 3"])])
def test_info_names_a_config_that_is_not_a_mapping(tmp_path, text, words):
    run = metrics_run(tmp_path, [loss_row(1, 2.5)])
    (run / "config.yaml").write_text(text)
    one_error_line(tool("info", run), 2, [f"error: {run / 'config.yaml'}: "] + words)
    one_error_line(tool("info", run / "config.yaml"), 2, [f"error: {run / 'config.yaml'}: "] + words)


def test_internal_error_is_one_line(capsys):
    def broken(argv):
        raise KeyError("boom")

    assert run_command(broken, []) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: KeyError: 'boom' (an internal error; OF_FACE_DEBUG=1 prints the traceback)"]

    def refused(argv):
        raise ToolError("--x 3: expected 1 or 2")

    assert run_command(refused, []) == 2
    assert capsys.readouterr().err.splitlines() == ["error: --x 3: expected 1 or 2"]


# --------------------------------------------------------------------------- training entry points


def test_yaml_syntax_error_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("Global:\n  mode: graph\n  epochs: [1, 2\nModel:\n  name: mbf\n")
    proc = train([], launcher="of_face", config=bad, check=False, timeout=120)
    line = one_error_line(proc, 2, [str(bad), "line 4, column 6: not valid YAML",
                                         "while parsing a flow sequence that starts at line 3, column 11"])
    assert len([ln for ln in proc.stderr.splitlines() if ln.strip() and "libibverbs" not in ln]) == 1, line
    proc = tool("train", "-c", bad)
    assert one_error_line(proc, 2, []) == line


def train_ddp(cwd, *args, timeout=300):
    env = {**os.environ, "PYTHON": sys.executable, "MASTER": f"127.0.0.1:{free_port()}"}
    return subprocess.run(["bash", str(REPO / "scripts" / "train_ddp.sh"), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_train_ddp_takes_relative_paths_from_the_callers_folder(tmp_path, synthetic_faces):
    project = tmp_path / "myproject"
    shutil.copytree(synthetic_faces(8, 4), project / "faces")
    proc = train_ddp(project, "-c", "missing.yaml")
    one_error_line(proc, 2, [f"config file not found: missing.yaml (looked for {project / 'missing.yaml'})"])
    # the config's own paths, relative; the rest of the tiny run as -o overrides
    (project / "my.yaml").write_text("Global:\n  output_dir: runs/a\nData:\n  root: faces\n")
    proc = train_ddp(project, "-c", "my.yaml", *o_args(tiny(None, None, "Data.batch_size=4", "Global.max_steps=2")),
                     "-o", "Global.output_dir=runs/b")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (project / "runs" / "b" / "backbone.npz").is_file()  # -o's relative path, from the caller's folder
    assert not (project / "runs" / "a").exists() and not (REPO / "runs").exists() and not (REPO / "faces").exists()
