#!/usr/bin/env bash
# The FC part of_face vs arcface_torch, interleaved, one table (bench/fc_vs_arcface_torch.py).
# Needs the bench-only PyTorch venv and arcface_torch's source of ../shared/anchors/README.md
# (ANCHOR_PY, ARCFACE_DIR; defaults under ~/.cache/of_face). PyTorch is never an of_face dependency.
# of_face's side runs with FC_CHUNKS (an integer K or auto) and FC_MEMORY_GIB from the environment
# (or --fc-chunks / --fc-memory-gib), e.g. FC_CHUNKS=auto bash bench/fc_vs_arcface_torch.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup.sh)
exec "$PY" bench/fc_vs_arcface_torch.py "$@"
