#!/usr/bin/env bash
# Largest FC class count at r 0.1, sparse update, 2 ranks (bench/fc_max_classes.py).
# Usage: bash bench/fc_max_classes.sh [--dims 512 128] [--budget-gib G] [--resolution 0.02] ...
# FC_CHUNKS (an integer K or auto) and FC_MEMORY_GIB pass through to every trial's bench/fc_part.py
# (or --fc-chunks / --fc-memory-gib); e.g. FC_CHUNKS=auto bash bench/fc_max_classes.sh streams the head
# in the K heads/memory.py predicts to fit the budget.
# Run it on a quiet machine: the default budget is MemAvailable at start minus 1.5 GiB, and every
# trial is killed by the script's watchdog before it can reach the kernel OOM killer.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup.sh)
exec "$PY" bench/fc_max_classes.py "$@"
