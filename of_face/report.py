"""`of-face plot RUN` and `of-face info RUN`: plots and a summary of a training run's folder.

A run folder is what the trainer writes to `Global.output_dir`: config.yaml, metrics.csv (see
`of_face.train.metrics` for its columns and for the plots: loss.png, lr.png, verification.png),
backbone.npz and any `ckpt*` checkpoints.

Imports neither OneFlow nor pyplot: cheap to run beside a training job.
"""
import argparse
import json
import os
import re

import numpy as np
import yaml

from of_face.errors import one_line_errors
from of_face.strict_yaml import one_line

# the metrics schema, readers and plots live with the writer; re-exported here for callers
from of_face.train.metrics import (CONFIG_FILE, METRICS_FILE, PLOTS, RunError, check_run,  # noqa: F401
                                   make_figures, plot_run, read_metrics, series, timeline)

# --------------------------------------------------------------------------- info


SECTIONS = ("Global", "Model", "Loss", "Data", "Optimizer", "AMP")  # the ones info reads


def _read_yaml(path):
    """A config file as a dict ({} when empty); RunError naming the file when it is not valid YAML,
    not a mapping of sections, or one of `SECTIONS` is not a mapping."""
    with open(path) as f:
        try:
            cfg = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise RunError(one_line(path, e)) from None
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise RunError(f"{path}: expected a mapping of config sections (Global:, Model:, ...), "
                       f"got {type(cfg).__name__} {_short(cfg)}")
    for name in SECTIONS:
        if cfg.get(name) is not None and not isinstance(cfg[name], dict):
            raise RunError(f"{path}: {name}: expected a mapping of keys, got {type(cfg[name]).__name__} "
                           f"{_short(cfg[name])}")
    return cfg


def _short(value, limit=60):
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _size(path):
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    return os.path.getsize(path)


def _num_classes(cfg):
    n = (cfg.get("Loss") or {}).get("num_classes") or 0
    if n:
        return str(n)
    prop = os.path.join(str((cfg.get("Data") or {}).get("root", "")), "property")
    try:
        with open(prop) as f:
            return f"{int(f.read().split(',')[0])} (from {prop})"
    except (OSError, ValueError):
        return "from the data set's property file"


def _batch(data, optimizer, checkpoints):
    """'batch B per rank', plus the global batch when a training checkpoint says how many ranks ran."""
    text, per_rank = f"batch {data.get('batch_size')} per rank", data.get("batch_size")
    plans = [c["batch_plan"] for c in checkpoints if c.get("batch_plan")]
    if plans:  # the newest checkpoint's BatchPlan (meta["batch_plan"]) when it has one
        plan = plans[-1]
        per_rank, world, accum = plan.get("per_rank"), plan.get("world"), int(plan.get("accum_steps") or 1)
        text = f"batch {per_rank} per rank"
        steps = f" x {accum} micro-batches" if accum > 1 else ""
        return f"{text} x {world} rank(s){steps} = global batch {plan.get('step_global')}"
    worlds = [c["world_size"] for c in checkpoints if c.get("world_size")]
    if not worlds or not isinstance(per_rank, int):
        return text
    world, accum = worlds[-1], int(optimizer.get("accum_steps") or 1)  # the newest checkpoint's world
    steps = f" x {accum} micro-batches" if accum > 1 else ""
    return f"{text} x {world} rank(s){steps} = global batch {per_rank * world * accum}"


def summarize(out_dir):
    """Everything `of-face info` prints, as a dict."""
    check_run(out_dir)
    cfg_path, metrics_path = os.path.join(out_dir, CONFIG_FILE), os.path.join(out_dir, METRICS_FILE)
    cfg = {}
    if os.path.isfile(cfg_path):
        cfg = _read_yaml(cfg_path)
    rows = timeline(read_metrics(metrics_path)) if os.path.isfile(metrics_path) else []
    losses = [r for r in rows if r["kind"] == "loss"]
    best = {}
    for r in rows:
        if r["kind"].startswith("verify:") and r["value"] is not None:
            name = r["kind"].split(":", 1)[1]
            if name not in best or r["value"] > best[name]["value"]:  # ties: the earliest step
                best[name] = r
    ckpts = []
    for name in sorted(os.listdir(out_dir)):
        p = os.path.join(out_dir, name)
        if name == "backbone.npz" or name.startswith("ckpt"):
            step = world = plan = None
            sharded = os.path.isdir(p) and os.path.isfile(os.path.join(p, "manifest.json"))  # complete ones only
            if name.endswith(".npz") or sharded:
                try:
                    with np.load(os.path.join(p, "main.npz") if sharded else p) as f:
                        step = int(f["__step__"]) if "__step__" in f.files else None
                        if "__meta__" in f.files:
                            meta = json.loads(bytes(f["__meta__"]).decode())
                            world, plan = meta.get("world_size"), meta.get("batch_plan")
                except Exception:  # a file cut short still gets its line, without the numbers
                    pass
            ckpts.append({"name": name, "bytes": _size(p), "step": step, "world_size": world,
                          "batch_plan": plan})
    plots = [f"{n}.png" for n in PLOTS if os.path.isfile(os.path.join(out_dir, f"{n}.png"))]
    saved = [c for c in ckpts if c["name"].startswith("ckpt-") and c["step"] is not None]
    saved = max(saved, key=lambda c: c["step"]) if saved else None  # what a resume would continue from
    return {"dir": out_dir, "config": cfg, "has_config": bool(cfg), "has_metrics": os.path.isfile(metrics_path),
            "last": losses[-1] if losses else None, "best": best, "checkpoints": ckpts, "plots": plots,
            "saved": saved}


def _config_lines(cfg, checkpoints):
    G, M, L, D = (cfg.get(k) or {} for k in ("Global", "Model", "Loss", "Data"))
    opt, A = cfg.get("Optimizer") or {}, cfg.get("AMP") or {}
    arch = f"layers {M.get('layers')}, " if M.get("layers") else ""
    amp = "on (init scale %g)" % A.get("init_scale", 0) if A.get("enable") else "off"
    return [
        f"model: {M.get('name')} ({arch}width {M.get('width')}, embedding {M.get('embedding_size')})",
        f"loss: margin {L.get('margin')} (m1, m2, m3), scale {L.get('scale')}, "
        f"sample rate {L.get('sample_rate')}, classes {_num_classes(cfg)}",
        f"data: {D.get('dataset')} at {D.get('root')}, {_batch(D, opt, checkpoints)}",
        f"training: {G.get('mode')} mode, AMP {amp}, "
        f"{opt.get('name')} lr {opt.get('lr')}, epochs {G.get('epochs')}"
        + (f", max_steps {G.get('max_steps')}" if G.get("max_steps") else ""),
    ]


def format_info(s):
    lines = [f"run: {s['dir']}"]
    if s["has_config"]:
        lines += _config_lines(s["config"], s["checkpoints"])
    else:
        lines.append(f"config: no {CONFIG_FILE}")
    last = s["last"]
    if last is None:
        lines.append("steps: none logged yet" if s["has_metrics"] else f"steps: no {METRICS_FILE} yet")
    else:
        lines.append(f"steps: {last['step']} / {last['total_steps']} done (epoch {last['epoch']})")
        ema = f" (EMA {last['loss_ema']:.4f})" if last["loss_ema"] is not None else ""
        lr = f", lr {last['lr']:.5g}" if last["lr"] is not None else ""
        lines.append(f"last loss: {last['value']:.4f}{ema} at step {last['step']}{lr}")
    saved = s.get("saved")
    lines.append(f"saved: step {saved['step']} ({saved['name']})" if saved
                 else "saved: no training checkpoint yet (a resume would start from scratch)")
    if s["best"]:
        for name, r in sorted(s["best"].items()):
            std = f" ± {r['std']:.4f}" if r["std"] is not None else ""
            lines.append(f"best verification: {name} accuracy {r['value']:.4f}{std} at step {r['step']}")
    else:
        lines.append("best verification: none yet")
    if s["checkpoints"]:
        for c in s["checkpoints"]:
            step = f", step {c['step']}" if c["step"] is not None else ""
            lines.append(f"checkpoint: {c['name']} ({c['bytes'] / 1e6:.2f} MB{step})")
    else:
        lines.append("checkpoints: none")
    lines.append(f"plots: {', '.join(s['plots'])}" if s["plots"] else "plots: none (run `of-face plot` to write them)")
    return "\n".join(lines)


def config_file_info(path):
    """`of-face info CONFIG.yaml`: the config's highlights; a model-zoo file named `..._<N>n<G>c_...`
    (PLSC's nodes x GPUs) also gets its global batch on N*G ranks."""
    cfg = _read_yaml(path)
    layout = re.search(r"_(\d+)n(\d+)c_", os.path.basename(path))
    ranks = [{"world_size": int(layout[1]) * int(layout[2])}] if layout else []
    where = f" ({layout[1]} node(s) x {layout[2]} GPUs, from its name)" if layout else ""
    return "\n".join([f"config: {path}{where}"] + _config_lines(cfg, ranks))


def _parse(argv, prog, text):
    p = argparse.ArgumentParser(prog=f"of-face {prog}", description=text)
    p.add_argument("run_dir", metavar="OUTPUT_DIR", help="a training run's Global.output_dir")
    return p.parse_args(argv)


@one_line_errors
def plot_main(argv=None):
    args = _parse(argv, "plot", "Write loss.png, lr.png and verification.png from a run's metrics.csv")
    written = plot_run(args.run_dir)
    for path in written.values():
        print(path)
    return 0


@one_line_errors
def info_main(argv=None):
    args = _parse(argv, "info", "Summarise a training run (config, progress, best verification, checkpoints) "
                  "or a config file")
    if os.path.isfile(args.run_dir) and args.run_dir.endswith((".yaml", ".yml")):
        print(config_file_info(args.run_dir))
    else:
        print(format_info(summarize(args.run_dir)))
    return 0
