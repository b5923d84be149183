"""What the user sees while training (progress line, metrics.csv, plots) and `of-face plot/info`."""
import csv
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, launch
from of_face import report
from of_face.config import load_config, save_config
from of_face.train.metrics import MetricsCSV
from of_face.train.progress import FIELDS, Progress

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class FakeClock:
    def __init__(self, *times):
        self.times = list(times)

    def __call__(self):
        return self.times.pop(0)


def quiet_progress(out_dir, total=10, batch=64, clock=None, rank=0, start_step=0):
    stream = io.StringIO()
    p = Progress(total, batch, str(out_dir), tty=False, rank=rank, stream=stream, start_step=start_step,
                 clock=clock or FakeClock(*range(100)))
    return p, stream


def cli(*args):
    return subprocess.run([sys.executable, "-m", "of_face.cli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_smoothed_loss_is_the_bias_corrected_ema_of_the_step_losses(tmp_path):
    x = np.random.default_rng(0).uniform(1.0, 9.0, 23)
    p, _ = quiet_progress(tmp_path, total=23)
    d = 0.9
    for end in (5, 10, 15, 20, 23):  # four intervals of 5 step losses, then 3
        row = p.update(end, 0, x[end - 5 if end < 23 else 20:end].tolist(), lr=0.1)
        seen = x[:end]
        w = (1 - d) * d ** np.arange(end - 1, -1, -1)  # weight of x_i in m_t
        assert row["loss_ema"] == pytest.approx(np.sum(w * seen) / (1 - d ** end), rel=1e-12)
        assert row["value"] == pytest.approx(np.mean(x[end - 5 if end < 23 else 20:end]), rel=1e-12)


def test_plain_line_holds_the_interval_numbers_and_excludes_paused_time(tmp_path):
    # clock: start 100; verification paused 102..132 (30 s excluded); update at 104 -> 4 s of training
    p, stream = quiet_progress(tmp_path, total=10, batch=64, clock=FakeClock(100.0, 102.0, 132.0, 134.0, 136.0))
    with p.paused():
        pass
    p.update(2, 0, [4.0, 3.0], lr=0.1, scale=None)
    p.update(4, 1, [2.0, 2.0], lr=0.05, scale=32768.0)
    first, second = stream.getvalue().splitlines()
    # 2 steps x 64 samples in 4 s = 32 samples/s; 8 steps left x 64 / 32 = 16 s;
    # ema: m1 = 0.4, m2 = 0.36 + 0.3 = 0.66, / (1 - 0.81) = 3.47368...
    assert first == ("step 2/10  epoch 0  loss 3.5000  ema 3.4737  lr 0.10000  scale -  "
                     "32.0 samples/s  eta 16s")
    # 2 steps x 64 in 2 s = 64 samples/s; 6 x 64 / 64 = 6 s
    assert second.startswith("step 4/10  epoch 1  loss 2.0000  ema ")
    assert "lr 0.05000  scale 32768  64.0 samples/s  eta 6s" in second


def test_non_finite_step_losses_are_left_out_of_mean_and_ema(tmp_path):
    p, stream = quiet_progress(tmp_path, total=4)
    row = p.update(2, 0, [float("nan"), 3.0], lr=0.1)
    assert row["value"] == 3.0 and row["loss_ema"] == 3.0  # one finite value: EMA = that value
    row = p.update(4, 0, [float("inf"), float("nan")], lr=0.1)
    assert np.isnan(row["value"]) and row["loss_ema"] == 3.0
    assert stream.getvalue().splitlines()[0].endswith("(1 non-finite step losses left out)")


def test_only_rank_0_prints_and_writes(tmp_path):
    p, stream = quiet_progress(tmp_path / "r1", rank=1)
    assert p.update(2, 0, [1.0, 2.0], lr=0.1) is None
    assert p.verification(2, "x", {"accuracy": 0.5, "std": 0.1}) is None
    assert p.close() == {}
    assert stream.getvalue() == "" and not (tmp_path / "r1").exists()


def test_rich_display_on_a_terminal(tmp_path):
    stream = io.StringIO()
    p = Progress(6, 8, str(tmp_path), tty=True, rank=0, stream=stream, clock=FakeClock(0.0, 1.0))
    p.update(2, 0, [3.0, 3.0], lr=0.1, scale=None)
    p.close(plots=False)
    text = stream.getvalue()
    assert "2/6" in text and "loss 3.0000 (EMA)" in text and "scale -" in text and "16.0 samples/s" in text
    assert "step 2/6  epoch 0" not in text  # the plain line is the non-terminal fallback only


def test_metrics_csv_round_trips_and_resumed_runs_append(tmp_path):
    p, _ = quiet_progress(tmp_path, total=6, batch=32, clock=FakeClock(0.0, 1.5, 2.25, 2.5, 6.5, 7.0))
    expected = [p.update(2, 0, [5.25, 4.75], lr=0.1, scale=65536.0),
                p.update(4, 0, [4.5, 4.0], lr=0.0625, scale=32768.0)]
    with p.paused():
        expected.append(p.verification(4, "synth_val", {"accuracy": 0.8125, "std": 0.0625, "xnorm": 3.0}))
    expected.append(p.update(6, 1, [3.0, 2.5], lr=0.01, scale=None))
    p.close(plots=False)
    # a resumed run appends to the same file (header written once)
    p2, _ = quiet_progress(tmp_path, total=8, batch=32, clock=FakeClock(0.0, 2.0), start_step=6)
    expected.append(p2.update(8, 1, [2.0, 1.0], lr=0.005))

    with open(tmp_path / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == FIELDS
        rows = list(reader)
    assert len(rows) == len(expected) == 5
    for got, want in zip(rows, expected):
        for key in FIELDS:
            v = want.get(key)
            if v is None:
                assert got[key] == "", key
            elif isinstance(v, str):
                assert got[key] == v
            else:
                assert float(got[key]) == v, key  # exact: repr of a float round-trips
    # and the values are the ones fed in / derived as documented
    assert [r["kind"] for r in rows] == ["loss", "loss", "verify:synth_val", "loss", "loss"]
    assert [float(r["value"]) for r in rows] == [5.0, 4.25, 0.8125, 2.75, 1.5]
    assert [r["scale"] for r in rows] == ["65536.0", "32768.0", "", "", ""]
    assert float(rows[0]["samples_per_s"]) == 2 * 32 / 1.5
    assert float(rows[1]["samples_per_s"]) == 2 * 32 / 0.75  # 2.25 - 1.5
    assert float(rows[3]["samples_per_s"]) == 2 * 32 / 0.75  # 7.0 - 2.25, less the 4 s paused
    assert float(rows[4]["samples_per_s"]) == 2 * 32 / 2.0


def test_an_old_three_column_metrics_file_is_widened_not_lost(tmp_path):
    (tmp_path / "metrics.csv").write_text("step,kind,value\n10,loss,4.5\n10,verify:a,0.75\n")
    p, _ = quiet_progress(tmp_path, total=20)
    p.update(20, 0, [4.0], lr=0.1)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv", newline="")))
    assert [(r["step"], r["kind"], r["value"]) for r in rows] == [
        ("10", "loss", "4.5"), ("10", "verify:a", "0.75"), ("20", "loss", "4.0")]


@pytest.mark.parametrize("tail, what", [(b"3,loss,2.1,0,2.", "a partial last row"),
                                        (b"3,loss,2.1,0\0\0\0\0\0\0", "NUL bytes"),
                                        (b"\0" * 64, "NUL bytes")])
def test_appending_after_a_crash_cuts_the_partial_row_first(tmp_path, tail, what):
    # the complete rows as a crashed run left them, written here with csv's own writer
    out = io.StringIO(newline="")
    w = csv.writer(out)
    w.writerow(FIELDS)
    w.writerow([1, "loss", 2.5, 0, 2.5, 0.1, "", 10.0, 5.0, 10, ""])
    w.writerow([2, "verify:a", 0.75] + [""] * (len(FIELDS) - 4) + [0.0625])
    complete = out.getvalue().encode()
    path = tmp_path / "metrics.csv"
    path.write_bytes(complete + tail)
    warnings = []
    m = MetricsCSV(str(path), warn=warnings.append)
    m.write({"step": 3, "kind": "loss", "value": 1.75, "epoch": 1})
    data = path.read_bytes()
    assert data.startswith(complete)  # the complete rows are kept byte for byte
    assert b"\0" not in data
    rows = list(csv.reader(io.StringIO(data.decode(), newline="")))
    assert rows[0] == FIELDS and all(len(r) == len(FIELDS) for r in rows)
    assert [r[:3] for r in rows[1:]] == [["1", "loss", "2.5"], ["2", "verify:a", "0.75"], ["3", "loss", "1.75"]]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: {path}: cut short at line 4 ({what}")
    assert "cut back to the 2 complete row(s)" in warnings[0]
    assert not [p.name for p in tmp_path.iterdir() if p.name != "metrics.csv"]  # no temporary left
    MetricsCSV(str(path), warn=warnings.append)  # an intact file: no warning, not rewritten
    assert len(warnings) == 1 and path.read_bytes() == data


def test_a_metrics_file_with_nothing_complete_starts_again_with_the_header(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_bytes(b"step,kind,val")  # the header itself cut short
    warnings = []
    MetricsCSV(str(path), warn=warnings.append).write({"step": 1, "kind": "loss", "value": 2.0})
    rows = list(csv.reader(open(path, newline="")))
    assert rows == [FIELDS, ["1", "loss", "2.0"] + [""] * (len(FIELDS) - 3)]
    assert len(warnings) == 1 and "cut back to the 0 complete row(s)" in warnings[0]


def test_timeline_keeps_the_latest_history_of_a_resumed_run():
    rows = [{"step": s, "kind": k, "value": v} for s, k, v in [
        (0, "verify:a", 0.5), (10, "loss", 4.0), (20, "loss", 3.0), (30, "loss", 2.5), (30, "verify:a", 0.7),
        (20, "loss", 3.1), (30, "loss", 2.4), (30, "verify:a", 0.8)]]  # resumed from a step-10 checkpoint
    kept = [(r["step"], r["kind"], r["value"]) for r in report.timeline(rows)]
    assert kept == [(0, "verify:a", 0.5), (10, "loss", 4.0), (20, "loss", 3.1), (30, "loss", 2.4),
                    (30, "verify:a", 0.8)]


# ----------------------------------------------------------------- `of-face plot` / `of-face info`

ROWS = [  # step, kind, value, epoch, loss_ema, lr, scale, samples_per_s, eta_s, total_steps, std
    [0, "verify:synth_val", 0.6933, "", "", "", "", "", "", "", 0.0496],
    [10, "loss", 5.1, 0, 5.2, 0.1, "", 20.5, 40.0, 50, ""],
    [20, "loss", 4.4, 0, 4.7, 0.08, "", 21.0, 30.0, 50, ""],
    [20, "verify:synth_val", 0.9412, "", "", "", "", "", "", "", 0.02],
    [20, "verify:other", 0.81, "", "", "", "", "", "", "", 0.05],
    [30, "loss", 3.9, 0, 4.2, 0.06, "", 22.0, 20.0, 50, ""],
    [40, "loss", 3.5, 1, 3.8, 0.04, "", 21.5, 10.0, 50, ""],
    [40, "verify:synth_val", 0.9301, "", "", "", "", "", "", "", 0.03],
    [40, "verify:other", 0.84, "", "", "", "", "", "", "", 0.04],
]


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    save_config(load_config(REPO / "configs" / "default.yaml"), d / "config.yaml")
    with open(d / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(FIELDS)
        w.writerows(ROWS)
    return d


def csv_series(path):
    """Independent reading of the CSV: {kind or 'loss_ema'/'lr': (steps, values)}."""
    out = {}
    for r in csv.DictReader(open(path, newline="")):
        cols = [("value", r["kind"])] + ([("loss_ema", "loss_ema"), ("lr", "lr")] if r["kind"] == "loss" else [])
        for col, name in cols:
            out.setdefault(name, ([], []))
            out[name][0].append(float(r["step"]))
            out[name][1].append(float(r[col]))
    return out


def test_plot_command_writes_pngs_of_the_csv_data(run_dir):
    proc = cli("plot", run_dir)
    assert proc.returncode == 0, proc.stderr
    for name in ("loss", "lr", "verification"):
        path = run_dir / f"{name}.png"
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == (700, 400)
        assert str(path) in proc.stdout
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == []  # no temp files left

    # the figures draw exactly the CSV's numbers
    want = csv_series(run_dir / "metrics.csv")
    figs = report.make_figures(report.series(report.timeline(report.read_metrics(run_dir / "metrics.csv"))))
    loss_lines = figs["loss"].axes[0].lines
    np.testing.assert_array_equal(loss_lines[0].get_xydata(), np.array(want["loss"]).T)
    np.testing.assert_array_equal(loss_lines[1].get_xydata(), np.array(want["loss_ema"]).T)
    np.testing.assert_array_equal(figs["lr"].axes[0].lines[0].get_xydata(), np.array(want["lr"]).T)
    by_label = {line.get_label(): line.get_xydata() for line in figs["verification"].axes[0].lines}
    assert set(by_label) == {"synth_val", "other"}
    for target in by_label:
        np.testing.assert_array_equal(by_label[target], np.array(want[f"verify:{target}"]).T)


def test_info_command_summarises_the_run(run_dir):
    np.savez(run_dir / "backbone.npz", __step__=np.int64(40), w=np.zeros(3, np.float32))
    meta = np.frombuffer(json.dumps({"step": 40, "world_size": 2}).encode(), np.uint8)
    np.savez(run_dir / "ckpt-00000040.npz", __step__=np.int64(40), __meta__=meta)
    proc = cli("info", run_dir)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout

    # best accuracy per target and its step, computed here from the CSV
    best = {}
    for r in csv.DictReader(open(run_dir / "metrics.csv", newline="")):
        if r["kind"].startswith("verify:"):
            name = r["kind"][7:]
            if name not in best or float(r["value"]) > best[name][0]:
                best[name] = (float(r["value"]), int(r["step"]))
    assert best == {"synth_val": (0.9412, 20), "other": (0.84, 40)}
    for name, (acc, step) in best.items():
        assert f"best verification: {name} accuracy {acc:.4f}" in out
        line = next(ln for ln in out.splitlines() if ln.startswith(f"best verification: {name} "))
        assert line.endswith(f"at step {step}")
    assert "steps: 40 / 50 done (epoch 1)" in out
    assert "last loss: 3.5000 (EMA 3.8000) at step 40" in out
    assert "model: iresnet (layers [1, 1, 1, 1], width 8, embedding 128)" in out
    assert "margin [1.0, 0.0, 0.1]" in out and "scale 16.0" in out and "sample rate 1.0" in out
    assert "batch 32 per rank x 2 rank(s) = global batch 64" in out and "graph mode, AMP off" in out
    assert "checkpoint: backbone.npz" in out and "step 40" in out and "checkpoint: ckpt-00000040" in out
    assert "plots: none" in out
    assert cli("plot", run_dir).returncode == 0
    assert "plots: loss.png, lr.png, verification.png" in cli("info", run_dir).stdout


@pytest.mark.parametrize("command", ["info", "plot"])
def test_a_folder_that_is_not_a_run_is_a_clear_error(tmp_path, command):
    (tmp_path / "stray.txt").write_text("not a run")
    for folder in (tmp_path, tmp_path / "missing"):
        proc = cli(command, folder)
        assert proc.returncode == 2
        assert proc.stdout == ""
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and str(folder) in lines[0] and "not an of_face run folder" in lines[0]


def test_a_short_training_run_leaves_metrics_and_plots(tmp_path):
    out = tmp_path / "run"
    proc = launch(["-m", "of_face.train.main", "-c", "configs/default.yaml",
                   "-o", f"Global.output_dir={out}", "-o", "Global.max_steps=4", "-o", "Global.log_interval=2",
                   "-o", "Global.eval_before_training=false", "-o", f"Data.root={tmp_path / 'synth'}",
                   "-o", "Data.synth_identities=8", "-o", "Data.synth_images_per_identity=8",
                   "-o", "Data.synth_val_identities=4", "-o", "Data.synth_val_pairs=40", "-o", "Data.batch_size=4",
                   "-o", "AMP.enable=true"], nproc=2, timeout=600)
    rows = list(csv.DictReader(open(out / "metrics.csv", newline="")))
    losses = [r for r in rows if r["kind"] == "loss"]
    assert [int(r["step"]) for r in losses] == [2, 4]
    assert all(np.isfinite(float(r["value"])) and int(r["total_steps"]) == 4 for r in losses)
    assert all(float(r["scale"]) > 0 for r in losses)  # AMP's live loss scale, read from the graph
    assert [r["kind"] for r in rows].count("verify:synth_val") == 1
    for r in losses:  # rank 0 alone prints the plain line (stdout is not a terminal here)
        assert proc.stdout.count(f"step {r['step']}/4  epoch 0  loss {float(r['value']):.4f}") == 1
    for name in ("loss", "lr", "verification"):
        assert (out / f"{name}.png").read_bytes()[:8] == PNG_SIGNATURE
    # the run's own checkpoint tells `of-face info` how many ranks trained: 4 per rank x 2 ranks
    assert "batch 4 per rank x 2 rank(s) = global batch 8" in cli("info", out).stdout
