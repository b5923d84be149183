#!/usr/bin/env bash
# Export a training run's backbone to ONNX (dynamic batch), checked against OneFlow.
#
#   bash scripts/export_onnx.sh -c RUN_DIR -o OUT.onnx [--opset N] [--bake-normalization] [--config CFG]
#
# RUN_DIR is a run's output folder (backbone.npz + config.yaml) or a backbone.npz. Paths are taken
# relative to the current directory. All options are those of `python -m of_face.export -h`.
# PYTHON=/path/to/python overrides the project's virtual environment.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$(bash "$REPO/scripts/setup.sh")}
# this clone's of_face, whichever clone the venv's editable install points at
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m of_face.export "$@"
