"""The FC part side by side with arcface_torch's PartialFC_V2, interleaved, one table of medians.

    python bench/fc_vs_arcface_torch.py [--reps 2] [--steps 6] [--only 100k-r0.1-512] [--fc-chunks K|auto]
                                        [--fc-memory-gib G]

For every configuration it runs ../shared/anchors/run_pfc.py (arcface_torch, in the bench-only
PyTorch venv of ../shared/anchors/README.md: $ANCHOR_PY, $ARCFACE_DIR) and bench/fc_part.py
(of_face, sparse update where r < 1) in turn, A, B, A, B, ... `--reps` times each, 2 ranks, then
prints per configuration the median step time (max over ranks), the peak RSS per rank (max over
ranks and runs) and of_face / arcface_torch for both. A run that dies (memory) is shown as such.
of_face's side runs with FC_CHUNKS / FC_MEMORY_GIB (`--fc-chunks`, `--fc-memory-gib`; default: the
environment's, else bench/fc_part.py's: the one compiled step) and reports the K it ran.
PyTorch is never imported here: it lives only in the anchor venv.
"""
import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
HOME_CACHE = Path.home() / ".cache" / "of_face"
# (label, classes, sample rate, embedding size); global batch 256 (128 per rank), as the table
CONFIGS = [
    ("1M-r0.1-512", 1_000_000, 0.1, 512),
    ("1M-r0.1-128", 1_000_000, 0.1, 128),
    ("100k-r1.0-512", 100_000, 1.0, 512),
    ("100k-r0.1-512", 100_000, 0.1, 512),
]
PER_RANK = 128


def port() -> str:
    return str(29000 + random.randrange(900))


def run_anchor(classes: int, rate: float, emb: int, steps: int) -> dict:
    anchor_py = os.environ.get("ANCHOR_PY", str(HOME_CACHE / "anchor-venv" / "bin" / "python"))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               ARCFACE_DIR=os.environ.get("ARCFACE_DIR", str(HOME_CACHE / "recognition" / "arcface_torch")))
    cmd = [anchor_py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(SHARED / "anchors" / "run_pfc.py"), "--num-classes", str(classes), "--sample-rate", str(rate),
           "--batch", str(PER_RANK), "--emb", str(emb), "--warmup", "3", "--steps", str(steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("SUMMARY "):
            s = json.loads(line[len("SUMMARY "):])
            return {"s": s["median_step_ms_max_over_ranks"] / 1e3, "rss": max(s["peak_rss_gib_per_rank"])}
    return {"error": f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or ['?'])[-1][:160]}"}


def run_of_face(classes: int, rate: float, emb: int, steps: int, chunks: str = "1", memory_gib: str = "0") -> dict:
    py = subprocess.run(["bash", "scripts/setup.sh"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    sparse = "1" if rate < 1.0 else "0"
    cmd = [py, "-m", "oneflow.distributed.launch", "--nproc_per_node", "2", "--master_port", port(),
           "bench/fc_part.py", str(classes), str(rate), sparse, str(emb), str(2 * PER_RANK)]
    env = dict(os.environ, FC_STEPS=str(steps), FC_CHUNKS=str(chunks), FC_MEMORY_GIB=str(memory_gib))
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    # (one JSON line per rank; the two ranks' writes may interleave on one line)
    ranks = [json.loads(m) for m in re.findall(r"\{[^{}]*\}", proc.stdout) if '"rank"' in m]
    if len(ranks) < 2:
        return {"error": f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or ['?'])[-1][:160]}"}
    return {"s": max(r["s_per_step"] for r in ranks), "rss": max(r["peak_rss_gib"] for r in ranks),
            "K": ranks[0].get("fc_chunks", 1)}


def summarise(runs: list) -> str:
    good = [r for r in runs if "error" not in r]
    if not good:
        return "died", None, None
    return "", statistics.median(r["s"] for r in good), max(r["rss"] for r in good)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=2, help="runs of each side per configuration (>= 2)")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per run")
    ap.add_argument("--only", action="append", help="configuration labels to run (default: all)")
    ap.add_argument("--fc-chunks", default=os.environ.get("FC_CHUNKS", "1"),
                    help="of_face's FC_CHUNKS: an integer K or auto (default: $FC_CHUNKS, else 1)")
    ap.add_argument("--fc-memory-gib", default=os.environ.get("FC_MEMORY_GIB", "0"),
                    help="of_face's FC_MEMORY_GIB, auto's per-rank budget (default: $FC_MEMORY_GIB, else the config's)")
    args = ap.parse_args(argv)
    configs = [c for c in CONFIGS if not args.only or c[0] in args.only]
    rows = []
    for label, classes, rate, emb in configs:
        anchor, ours = [], []
        for rep in range(args.reps):  # A, B, A, B: the machine's load changes under both alike
            anchor.append(run_anchor(classes, rate, emb, args.steps))
            ours.append(run_of_face(classes, rate, emb, args.steps, args.fc_chunks, args.fc_memory_gib))
            print(f"{label} rep {rep + 1}: arcface_torch {anchor[-1]}  of_face {ours[-1]}", file=sys.stderr, flush=True)
        (ea, ta, ma), (eo, to, mo) = summarise(anchor), summarise(ours)
        ratio_t = f"{to / ta:.2f}" if ta and to else "-"
        ratio_m = f"{mo / ma:.2f}" if ma and mo else "-"
        cell_a = ea or f"{ta:.2f} s, {ma:.2f} GiB"
        ks = sorted({r["K"] for r in ours if "K" in r})
        cell_o = eo or f"{to:.2f} s, {mo:.2f} GiB" + (f", K {'/'.join(map(str, ks))}" if ks != [1] else "")
        rows.append(f"| {label} | {cell_a} | {cell_o} | {ratio_t} | {ratio_m} |")
    print(f"medians of {args.reps} interleaved runs each, 2 ranks, global batch {2 * PER_RANK}, of_face with "
          f"FC_CHUNKS={args.fc_chunks} FC_MEMORY_GIB={args.fc_memory_gib}, load average at the end "
          f"{os.getloadavg()[0]:.1f}")
    print("| work | arcface_torch (step, peak RSS/rank) | of_face | time ratio | memory ratio |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
