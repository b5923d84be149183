"""What the user sees while training: a live progress bar (or plain lines), metrics.csv, plots.

`Progress` is driven by the trainer loop once per log interval (`update`) and once per
verification (`verification`); only rank 0 prints and writes, the other ranks' instances do
nothing (every rank may call them, so the loop stays the same on all ranks).

Display:
  * stdout is a terminal: a rich progress bar — step/total, epoch, smoothed loss, lr, AMP grad
    scale ("-" when AMP is off), samples/s, ETA; verification results print above it.
  * otherwise (CI, `| tee`, launcher logs): one plain line per log interval,
    `step 20/125  epoch 0  loss 4.1234  ema 4.2001  lr 0.09600  scale -  22.1 samples/s  eta 47s`.

Smoothed loss: a bias-corrected exponential moving average over the per-step losses,
    m_t = d * m_(t-1) + (1 - d) * x_t,  m_0 = 0,   ema_t = m_t / (1 - d^t)     (d = 0.9)
(Adam's bias correction: the first values are not pulled towards 0). `loss` in the plain line
and the CSV's `value` is the plain mean of the interval's step losses.

metrics.csv: one row per log interval (kind `loss`) and per verification (kind
`verify:<target>`); its schema, writer, readers and the plots are in `of_face.train.metrics`.
Samples/s and ETA exclude time spent inside `paused()` (the trainer wraps verification in it).
"""
import atexit
import contextlib
import math
import os
import sys
import time

from of_face.train.metrics import FIELDS  # noqa: F401  (re-exported: the CSV columns)
from of_face.train.metrics import EMA_DECAY, METRICS_FILE, MetricsCSV, plot_run


class EMA:
    """Bias-corrected exponential moving average (see the module docstring)."""

    def __init__(self, decay=EMA_DECAY):
        self.decay, self.m, self.t = decay, 0.0, 0

    def add(self, x):
        self.t += 1
        self.m = self.decay * self.m + (1.0 - self.decay) * float(x)
        return self.value

    @property
    def value(self):
        return self.m / (1.0 - self.decay ** self.t) if self.t else float("nan")


def format_scale(scale):
    return "-" if scale is None else f"{scale:g}"


def format_eta(seconds):
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def plain_line(row):
    """The non-terminal progress line for a `loss` row."""
    return (f"step {row['step']}/{row['total_steps']}  epoch {row['epoch']}  loss {row['value']:.4f}  "
            f"ema {row['loss_ema']:.4f}  lr {row['lr']:.5f}  scale {format_scale(row['scale'])}  "
            f"{row['samples_per_s']:.1f} samples/s  eta {row['eta_s']:.0f}s")


def verification_line(step, name, result, label=None):
    r = result
    text = f"[verify {label}] " if label else "[verify] "
    text += f"step {step} {name}: accuracy {r['accuracy']:.4f}"
    if "std" in r:
        text += f" ± {r['std']:.4f}"
    if "xnorm" in r:
        text += f"  XNorm {r['xnorm']:.2f}"
    if "pairs" in r:
        text += f"  ({r['pairs']} pairs, unseen identities)"
    return text


def _rich_display(stream):
    """A two-line rich bar (fits 80 columns): bar, step/total, epoch, ETA, elapsed; below it the
    smoothed loss, lr, grad scale and samples/s."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as RichProgress
    from rich.text import Text

    class TwoLine(RichProgress):
        def get_renderables(self):
            yield self.make_tasks_table(self.tasks)
            for task in self.tasks:
                yield Text("  " + task.fields.get("info", ""), no_wrap=True, overflow="ellipsis")

    return TwoLine(
        TextColumn("[bold]train"), BarColumn(bar_width=24), MofNCompleteColumn(),
        TextColumn("epoch {task.fields[epoch]}"), TextColumn("eta {task.fields[eta]}"),
        TextColumn("elapsed"), TimeElapsedColumn(), console=Console(file=stream, force_terminal=True),
        redirect_stdout=stream is sys.stdout, redirect_stderr=False,
    )


class Progress:
    """Progress display + metrics.csv + plots for one training run (see the module docstring).

    total_steps, global_batch: for step/total, samples/s and ETA. out_dir: where metrics.csv and
    the plots go. tty: rich bar (True) or plain lines (False); None = whether `stream` (default
    stdout) is a terminal. rank: None = this process's rank (imports OneFlow); pass 0 in tests.
    """

    def __init__(self, total_steps, global_batch, out_dir, tty=None, rank=None, stream=None,
                 start_step=0, ema_decay=EMA_DECAY, clock=time.monotonic):
        if rank is None:
            from of_face import parallel

            rank = parallel.rank()
        self.active = rank == 0
        self.total_steps, self.global_batch, self.out_dir = total_steps, global_batch, out_dir
        self.stream = stream if stream is not None else sys.stdout
        self.tty = bool(tty if tty is not None else getattr(self.stream, "isatty", lambda: False)())
        self.ema = EMA(ema_decay)
        self.clock = clock
        self._t0 = clock()
        self._last_step = start_step
        self._closed = False
        self._rich = None
        if not self.active:
            return
        os.makedirs(out_dir, exist_ok=True)
        self.metrics = MetricsCSV(os.path.join(out_dir, METRICS_FILE))
        if self.tty:
            self._rich = _rich_display(self.stream)
            self._task = self._rich.add_task("train", total=total_steps, completed=start_step,
                                             epoch="-", eta="?", info="waiting for the first log interval")
            self._rich.start()
            atexit.register(self._stop_display)

    @contextlib.contextmanager
    def paused(self):
        """Time inside this block (e.g. verification) does not count towards samples/s and ETA."""
        start = self.clock()
        try:
            yield
        finally:
            self._t0 += self.clock() - start

    def update(self, step, epoch, losses, lr, scale=None):
        """One log interval: `losses` are the per-step losses since the last update (all ranks
        pass the same values). Non-finite losses (NaN/inf: e.g. AMP overflow steps, which the
        trainer tolerates up to Global.max_nonfinite_steps) are left out of the EMA and the mean
        and counted in the display. Returns the metrics row (rank 0; None elsewhere)."""
        finite = [float(x) for x in losses if math.isfinite(float(x))]
        bad = len(losses) - len(finite)
        for x in finite:
            self.ema.add(x)
        now = self.clock()
        dt = now - self._t0
        steps = step - self._last_step if step > self._last_step else max(len(losses), 1)
        value = sum(finite) / len(finite) if finite else float("nan")
        self._t0, self._last_step = now, step
        if not self.active:
            return None
        speed = steps * self.global_batch / max(dt, 1e-9)
        eta = (self.total_steps - step) * self.global_batch / max(speed, 1e-9)
        row = {"step": step, "kind": "loss", "value": value, "epoch": epoch,
               "loss_ema": self.ema.value, "lr": float(lr), "scale": None if scale is None else float(scale),
               "samples_per_s": speed, "eta_s": eta, "total_steps": self.total_steps}
        self.metrics.write(row)
        if self._rich is not None:
            info = (f"loss {row['loss_ema']:.4f} (EMA)  lr {row['lr']:.5f}  scale {format_scale(row['scale'])}  "
                    f"{speed:.1f} samples/s" + (f"  {bad} non-finite" if bad else ""))
            self._rich.update(self._task, completed=step, epoch=epoch, eta=format_eta(eta), info=info)
        else:
            print(plain_line(row) + (f"  ({bad} non-finite step losses left out)" if bad else ""),
                  file=self.stream, flush=True)
        return row

    def verification(self, step, name, result, label=None):
        """One verification result ({'accuracy', 'std', ...} as `Verifier.run` returns per target)."""
        if not self.active:
            return None
        row = {"step": step, "kind": f"verify:{name}", "value": float(result["accuracy"]),
               "std": float(result["std"]) if "std" in result else None}
        self.metrics.write(row)
        line = verification_line(step, name, result, label)
        if self._rich is not None:
            self._rich.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            print(line, file=self.stream, flush=True)
        return row

    def _stop_display(self):
        if self._rich is not None:
            self._rich.stop()
            self._rich = None

    def close(self, plots=True):
        """Stop the display and write the plots (rank 0). Returns {name: path} of the plots."""
        if self._closed or not self.active:
            return {}
        self._closed = True
        self._stop_display()
        if not plots:
            return {}
        try:
            return plot_run(self.out_dir)
        except Exception as e:  # a plotting problem must not fail a finished training run
            print(f"warning: could not write plots to {self.out_dir}: {e}", file=self.stream, flush=True)
            return {}
