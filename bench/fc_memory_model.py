"""heads/memory.py's predicted peak per rank against the measured one (bench/fc_part.py), over a grid.

    python bench/fc_memory_model.py run [--out bench_fc_memory.jsonl] [--only LABEL ...]
    python bench/fc_memory_model.py table [--out bench_fc_memory.jsonl]
    python bench/fc_memory_model.py fit [--out bench_fc_memory.jsonl]
    python bench/fc_memory_model.py tally [--only LABEL ...]

`run` launches, one at a time, `FC_CHUNKS=K FC_OPTIMIZER=OPT python -m oneflow.distributed.launch
--nproc_per_node 2 bench/fc_part.py C RATE SPARSE DIM 256` for each configuration of GRID and appends
one JSON line per configuration (max over the ranks of peak RSS, ru_maxrss) to --out; configurations
already in the file are skipped, so an interrupted grid resumes. `table` recomputes the prediction of
every stored measurement with the formula as it is now (so a change of coefficients needs no new
measurement) and prints the markdown table of docs/BENCHMARKS.md (P2d) with the error. `fit` prints
the least-squares process base (BASE_GIB) over the stored measurements, the other terms fixed.
`tally` runs the configurations given (FC_TALLY=1) and prints each compiled job's buffers as bytes
per element of the formula's shapes ([N, c], [c, D], [L], ...): the counts the formula's
coefficients are read from (heads/memory.py), to recount when the head's jobs change.
"""
import argparse
import json
import math
import os
import random
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from of_face.heads import memory  # noqa: E402  (pure arithmetic: OneFlow is not imported)

WORLD, BATCH = 2, 256
# (classes, rate, sparse, dim, K, optimizer)
GRID = [
    (200_000, 0.1, 1, 128, 1, "sgd"),
    (1_000_000, 0.1, 1, 128, 1, "sgd"), (1_000_000, 0.1, 1, 128, 2, "sgd"), (1_000_000, 0.1, 1, 128, 4, "sgd"),
    (1_000_000, 0.1, 1, 128, 8, "sgd"),
    (2_000_000, 0.1, 1, 128, 1, "sgd"), (2_000_000, 0.1, 1, 128, 4, "sgd"),
    (4_000_000, 0.1, 1, 128, 4, "sgd"), (4_000_000, 0.1, 1, 128, 16, "sgd"),
    (1_000_001, 0.1, 1, 128, 1, "sgd"), (1_000_001, 0.1, 1, 128, 4, "sgd"),
    (500_000, 0.1, 1, 512, 1, "sgd"), (500_000, 0.1, 1, 512, 4, "sgd"),
    (1_000_000, 0.1, 1, 512, 1, "sgd"), (1_000_000, 0.1, 1, 512, 4, "sgd"), (1_000_000, 0.1, 1, 512, 16, "sgd"),
    (2_000_000, 0.1, 1, 512, 8, "sgd"),
    (1_000_000, 0.1, 1, 128, 1, "adamw"), (1_000_000, 0.1, 1, 128, 4, "adamw"), (1_000_000, 0.1, 1, 512, 4, "adamw"),
    (100_000, 1.0, 0, 128, 1, "sgd"), (1_000_000, 0.1, 0, 128, 1, "sgd"),
]


def label(classes, rate, sparse, dim, chunks, optimizer) -> str:
    return f"{classes}-r{rate}-{'sparse' if sparse else 'dense'}-{dim}-K{chunks}-{optimizer}"


def shape_of(m: dict) -> memory.HeadShape:
    """The HeadShape of a stored measurement (bench/fc_part.py's settings: SGD momentum 0.9, wd 5e-4)."""
    local = math.ceil(m["classes"] / WORLD)
    kept = m["kept_per_rank"]
    sparse = bool(m["sparse"])
    adamw = m.get("optimizer", "sgd") == "adamw"
    return memory.HeadShape(local, kept, m["dim"], m["batch"], WORLD, 2 if adamw else 1, sparse,
                            m["classes"] % WORLD != 0, sparse and not adamw, sparse and adamw)


def run(args) -> int:
    out = Path(args.out)
    done = {m["label"] for m in rows(args.out)} if out.exists() else set()
    py = subprocess.run(["bash", "scripts/setup.sh"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    for cfg in GRID:
        name = label(*cfg)
        if name in done or (args.only and name not in args.only):
            continue
        classes, rate, sparse, dim, chunks, optimizer = cfg
        cmd = [py, "-m", "oneflow.distributed.launch", "--nproc_per_node", str(WORLD),
               "--master_port", str(29000 + random.randrange(900)),
               "bench/fc_part.py", str(classes), str(rate), str(sparse), str(dim), str(BATCH)]
        env = dict(os.environ, FC_CHUNKS=str(chunks), FC_OPTIMIZER=optimizer, FC_STEPS=str(args.steps))
        load = os.getloadavg()[0]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
        # (the two ranks print one line each; their writes may interleave on one line)
        ranks = [json.loads(m) for m in re.findall(r"\{[^{}]*\}", proc.stdout) if '"rank"' in m]
        if len(ranks) < WORLD:
            last = (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
            print(f"{name}: failed (exit {proc.returncode}): {last}", flush=True)
            continue
        row = dict(ranks[0], label=name, peak_rss_gib=max(r["peak_rss_gib"] for r in ranks),
                   s_per_step=max(r["s_per_step"] for r in ranks), load_before=round(load, 2),
                   date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
        row.pop("rank", None)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    return 0


def tally(args) -> int:
    py = subprocess.run(["bash", "scripts/setup.sh"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    for cfg in GRID:
        name = label(*cfg)
        if args.only and name not in args.only:
            continue
        classes, rate, sparse, dim, chunks, optimizer = cfg
        cmd = [py, "-m", "oneflow.distributed.launch", "--nproc_per_node", str(WORLD),
               "--master_port", str(29000 + random.randrange(900)),
               "bench/fc_part.py", str(classes), str(rate), str(sparse), str(dim), str(BATCH)]
        env = dict(os.environ, FC_CHUNKS=str(chunks), FC_OPTIMIZER=optimizer, FC_STEPS="1", FC_TALLY="1")
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
        found = [line for line in proc.stdout.splitlines() if line.startswith('{"tally"')]
        if not found:
            print(f"{name}: failed (exit {proc.returncode})", flush=True)
            continue
        print(name)
        for job, coefficients in json.loads(found[0])["tally"].items():
            print(f"  {job}: {coefficients}", flush=True)
    return 0


def rows(path: str) -> list:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def table(args) -> int:
    ms = rows(args.out)
    print("| classes | dim | r | update | optimizer | K | kept/rank | measured GiB/rank | predicted | error |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for m in ms:
        p = memory.predicted_gib(shape_of(m), m["fc_chunks"])
        err = (p - m["peak_rss_gib"]) / m["peak_rss_gib"]
        worst = max(worst, abs(err))
        print(f"| {m['classes']:,} | {m['dim']} | {m['rate']} | {'sparse' if m['sparse'] else 'dense'} | "
              f"{m.get('optimizer', 'sgd')} | {m['fc_chunks']} | {m['kept_per_rank']:,} | {m['peak_rss_gib']:.2f} | "
              f"{p:.2f} | {100 * err:+.1f} % |")
    print(f"\n{len(ms)} measurements, largest error {100 * worst:.1f} %")
    if args.terms:
        for m in ms:
            terms = memory.predict(shape_of(m), m["fc_chunks"])
            print(m["label"], {k: round(v / memory.GIB, 3) for k, v in terms.items()})
    return 0


def fit(args) -> int:
    ms = rows(args.out)
    residuals = [m["peak_rss_gib"] - (memory.predicted_gib(shape_of(m), m["fc_chunks"]) - memory.BASE_GIB)
                 for m in ms]
    base = sum(residuals) / len(residuals)
    # relative error matters: weigh each measurement by 1 / measured^2
    w = [1.0 / m["peak_rss_gib"] ** 2 for m in ms]
    base_rel = sum(wi * r for wi, r in zip(w, residuals)) / sum(w)
    print(f"process base: {base:.3f} GiB (least squares), {base_rel:.3f} GiB (relative least squares); "
          f"residuals min {min(residuals):.3f} max {max(residuals):.3f}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["run", "table", "fit", "tally"])
    ap.add_argument("--out", default="bench_fc_memory.jsonl", help="JSON lines: one measurement per configuration")
    ap.add_argument("--only", nargs="+", help="labels to run (default: the whole grid)")
    ap.add_argument("--steps", type=int, default=3, help="FC_STEPS of each run (after 2 warm-up steps)")
    ap.add_argument("--terms", action="store_true", help="table: also print each prediction term by term")
    args = ap.parse_args(argv)
    return {"run": run, "table": table, "fit": fit, "tally": tally}[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())
