#!/usr/bin/env bash
# P2 grid: the FC part at 100k / 1M / 2M classes on 2 ranks, r=1 dense, r=0.1 dense, r=0.1 sparse.
# Usage: DIM=128 bash bench/fc_part_all.sh [OUT.jsonl]   (one JSON line per rank and configuration;
# a configuration that dies, e.g. killed for memory, gets one line with its exit status)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup.sh)
out=${1:-bench_fc_part.jsonl}
dim=${DIM:-512}
for classes in ${CLASSES:-100000 1000000 2000000}; do
  for cfg in "1.0 0" "0.1 0" "0.1 1"; do
    set -- $cfg
    lines=$($PY -m oneflow.distributed.launch --nproc_per_node 2 --master_port $((29900 + RANDOM % 90)) \
      bench/fc_part.py "$classes" "$1" "$2" "$dim" 2>/dev/null | grep '^{')
    status=$?
    [ -n "$lines" ] || lines="{\"classes\": $classes, \"rate\": $1, \"sparse\": $2, \"dim\": $dim, \"error\": \"died (dmesg: out of memory?)\"}"
    echo "$lines" | tee -a "$out"
  done
done
