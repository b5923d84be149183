#!/usr/bin/env bash
# P2 grid: the FC part at 100k / 1M / 2M classes on 2 ranks, r=1 dense, r=0.1 dense, r=0.1 sparse.
# Usage: bash bench/fc_part_all.sh [OUT.jsonl]   (one JSON line per rank and configuration)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup.sh)
out=${1:-bench_fc_part.jsonl}
for classes in 100000 1000000 2000000; do
  for cfg in "1.0 0" "0.1 0" "0.1 1"; do
    set -- $cfg
    $PY -m oneflow.distributed.launch --nproc_per_node 2 --master_port $((29900 + RANDOM % 90)) \
      bench/fc_part.py "$classes" "$1" "$2" 2>/dev/null | grep '^{' | tee -a "$out"
  done
done
