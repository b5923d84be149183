#!/usr/bin/env bash
# Export a training run's backbone to ONNX (dynamic batch), checked against OneFlow.
#
#   bash scripts/export_onnx.sh -c RUN_DIR -o OUT.onnx [--opset N] [--bake-normalization] [--config CFG]
#
# RUN_DIR is a run's output folder (backbone.npz + config.yaml) or a backbone.npz. Paths are taken
# relative to the current directory. This script keeps its own short flags: -c RUN_DIR and -o OUT
# are passed on as `of-face export --checkpoint RUN_DIR --out OUT` (in of-face, -c is a config file
# and -o a config override); every other option is one of `of-face export -h`, passed unchanged.
# PYTHON=/path/to/python overrides the project's virtual environment.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
args=()
while (($#)); do
    case "$1" in
        -c|-o)
            if (($# < 2)); then
                echo "export_onnx.sh: $1 needs a value" >&2
                exit 2
            fi
            if [[ $1 == -c ]]; then args+=(--checkpoint "$2"); else args+=(--out "$2"); fi
            shift 2
            ;;
        *)
            args+=("$1")
            shift
            ;;
    esac
done
PY=${PYTHON:-$(bash "$REPO/scripts/setup.sh")}
# this clone's of_face, whichever clone the venv's editable install points at
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m of_face.export ${args[@]+"${args[@]}"}
