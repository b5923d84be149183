"""A training run's metrics: the metrics.csv schema, its writer and readers, and the plots.

One module for both sides: `of_face.train.progress` appends rows while training, `of-face plot`
/ `of-face info` (`of_face.report`) read them back.

metrics.csv is an append-only log, one row per log interval (kind `loss`) and per verification
(kind `verify:<target>`); columns `FIELDS` (an older `step,kind,value` file is rewritten once
with the wider header, rows kept). A resumed or repeated run appends to the same file; readers
(`timeline`) let a later row replace earlier rows at later steps. `loss_ema` is the
bias-corrected EMA of the step losses with decay `EMA_DECAY` (see of_face.train.progress).

Plots are loss.png (interval mean and EMA), lr.png and verification.png (accuracy per target),
drawn with matplotlib's Agg canvas (no display needed, no pyplot) and written atomically.
Imports neither OneFlow nor matplotlib at module level: cheap to import beside a training job.
"""
import csv
import io
import os
import sys
from typing import Callable, Dict, List, Optional, Tuple

from of_face.errors import ToolError
from of_face.io import atomic_write, complete_part, cut_to_complete_rows, cut_where, row_count
from of_face.run.names import CONFIG_FILE, METRICS_FILE, PLOTS  # noqa: F401  (the run folder's names)

# step, kind, value come first and mean what they always meant (older readers keep working)
FIELDS = ["step", "kind", "value", "epoch", "loss_ema", "lr", "scale", "samples_per_s", "eta_s",
          "total_steps", "std"]
EMA_DECAY = 0.9
_INT = ("step", "epoch", "total_steps")
_FLOAT = ("value", "loss_ema", "lr", "scale", "samples_per_s", "eta_s", "std")


class RunError(ToolError):
    """A folder that is not (yet) a usable run, or a metrics.csv that cannot be read; one message
    naming the folder or file (exit code 2)."""


class MetricsCSV:
    """Append rows to `path` with the `FIELDS` header. On opening (before this process's first row,
    and before a live progress display owns the terminal, hence not at the first `write`), a file
    a crash left cut short is cut back to its last complete row (else the new row would be glued
    to the partial one) and an older narrower file is widened once; both rewrites are atomic."""

    def __init__(self, path: str, warn: Optional[Callable[[str], None]] = None):
        self.path = path
        if not os.path.isfile(path) or not cut_to_complete_rows(path, warn or _warn):
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header, rows = reader.fieldnames, list(reader)
        if header != FIELDS:  # e.g. the old step,kind,value file: rewrite it with the new header
            with atomic_write(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
                w.writeheader()
                w.writerows(rows)

    def write(self, row: Dict[str, object]) -> None:
        new = not os.path.isfile(self.path) or os.path.getsize(self.path) == 0
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                w.writeheader()
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in FIELDS})


def check_run(out_dir: str) -> None:
    """Raise RunError unless out_dir holds a config.yaml or a metrics.csv."""
    if not (os.path.isfile(os.path.join(out_dir, CONFIG_FILE)) or os.path.isfile(os.path.join(out_dir, METRICS_FILE))):
        what = "folder not found" if not os.path.isdir(out_dir) else f"no {CONFIG_FILE} or {METRICS_FILE}"
        raise RunError(f"{out_dir}: not an of_face run folder ({what})")


def _complete_text(path: str, warn: Callable[[str], None]) -> str:
    """metrics.csv's text up to its last complete row (`warn` says when that is not all of it)."""
    kept, what = complete_part(path)
    if what:
        warn(cut_where(path, kept, what) + f"reading the {row_count(kept)} complete row(s) before it")
    return kept.decode("utf-8", "replace")


def _warn(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def read_metrics(path: str, warn: Callable[[str], None] = _warn) -> List[Dict[str, object]]:
    """metrics.csv rows in file order, numbers parsed (empty cells -> None). A file cut by a crash
    is read up to its last complete row (`warn` says so); a cell that is not a number raises
    RunError naming the file, line, column and value."""
    rows = []
    reader = csv.DictReader(io.StringIO(_complete_text(path, warn), newline=""))
    for raw in reader:
        line = reader.line_num
        if None in raw:
            raise RunError(f"{path}: line {line} has {len(FIELDS) + len(raw[None])} fields, expected at most "
                           f"{len(FIELDS)} ({','.join(FIELDS)})")
        row = {"kind": raw.get("kind") or ""}
        for k in _INT + _FLOAT:
            v = raw.get(k)
            try:
                row[k] = None if v in (None, "") else (int(float(v)) if k in _INT else float(v))
            except ValueError:
                raise RunError(f"{path}: line {line}, column {k}: {v!r} is not a number; expected a number or "
                               "an empty cell") from None
        rows.append(row)
    return rows


def timeline(rows: List[Dict[str, object]]) -> List[Dict[str, object]]:
    """The rows of the latest history: a row at step s replaces every earlier row at a later step
    and earlier rows of its kind at step s (a resumed or repeated run appends to the same file)."""
    kept = []
    for row in rows:
        s = row["step"]
        while kept and kept[-1]["step"] > s:
            kept.pop()
        i = len(kept)
        while i and kept[i - 1]["step"] == s:
            i -= 1
        kept[i:] = [r for r in kept[i:] if r["kind"] != row["kind"]]
        kept.append(row)
    return kept


def series(rows: List[Dict[str, object]]) -> Dict[str, Tuple[list, list]]:
    """{name: (steps, values)} of what the plots draw: loss, loss_ema, lr, scale, verify:<target>."""
    out = {}

    def add(name, step, value):
        if value is not None:
            steps, values = out.setdefault(name, ([], []))
            steps.append(step)
            values.append(value)

    for r in rows:
        if r["kind"] == "loss":
            add("loss", r["step"], r["value"])
            add("loss_ema", r["step"], r["loss_ema"])
            add("lr", r["step"], r["lr"])
            add("scale", r["step"], r["scale"])
        elif r["kind"].startswith("verify:"):
            add(r["kind"], r["step"], r["value"])
    return out


def make_figures(data: Dict[str, Tuple[list, list]]) -> Dict[str, object]:
    """matplotlib Figures (Agg canvas) for the series; verification only when there is some."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    def figure(title, ylabel):
        fig = Figure(figsize=(7, 4), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        return fig, ax

    figs = {}
    fig, ax = figure("training loss", "loss")
    if "loss" in data:
        ax.plot(*data["loss"], marker=".", alpha=0.5, label="mean over log interval")
    if "loss_ema" in data:
        ax.plot(*data["loss_ema"], linewidth=2, label=f"EMA (decay {EMA_DECAY}, bias-corrected)")
    ax.legend(loc="upper right")
    figs["loss"] = fig
    fig, ax = figure("learning rate", "lr")
    if "lr" in data:
        ax.plot(*data["lr"], label="lr")
    figs["lr"] = fig
    targets = sorted(k for k in data if k.startswith("verify:"))
    if targets:
        fig, ax = figure("verification accuracy (10-fold)", "accuracy")
        for k in targets:
            ax.plot(*data[k], marker="o", label=k.split(":", 1)[1])
        ax.legend(loc="lower right")
        figs["verification"] = fig
    return figs


def plot_run(out_dir: str) -> Dict[str, str]:
    """Write <out_dir>/{loss,lr,verification}.png from metrics.csv; returns {name: path}."""
    check_run(out_dir)
    path = os.path.join(out_dir, METRICS_FILE)
    if not os.path.isfile(path):
        raise RunError(f"{out_dir}: no {METRICS_FILE} yet (nothing logged); nothing to plot")
    figs = make_figures(series(timeline(read_metrics(path))))
    written = {}
    for name, fig in figs.items():
        dest = os.path.join(out_dir, f"{name}.png")
        with atomic_write(dest) as f:
            fig.savefig(f, format="png")
        written[name] = dest
    return written
