#!/usr/bin/env bash
# Launch training on every process of this node (of_face.train.launch: the config is checked
# once before any process starts; a failure on any rank ends every rank, prints one `error:` line
# and hands the rank's exit code to the shell: 2 bad config/input, 1 runtime failure, 3 diverged).
#
#   bash scripts/train_ddp.sh [-c CONFIG] [-o Section.key=value ...]
#
# Multi-node (run the same command on every node):
#   NNODES=2 NODE_RANK=0 MASTER=10.0.0.1:12538 CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 bash scripts/train_ddp.sh -c ...
#   NNODES=2 NODE_RANK=1 MASTER=10.0.0.1:12538 CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 bash scripts/train_ddp.sh -c ...
# Processes per node: NPROC_PER_NODE if set; else one per GPU in CUDA_VISIBLE_DEVICES, or one per
# GPU that nvidia-smi lists when that is unset; else (no GPU) 2.
#
# Relative paths (-c, paths in -o values and in the config: Data.root, Global.output_dir, ...)
# are taken from the folder this script is run in, not from the repository: the script does not
# change directory. Without -c it trains configs/default.yaml of this repository.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)

PY=${PYTHON:-$(bash "$REPO/scripts/setup.sh")}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER=${MASTER:-127.0.0.1:12538}
if [ -n "${NPROC_PER_NODE:-}" ]; then
    NPROC=$NPROC_PER_NODE
elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [ "$CUDA_VISIBLE_DEVICES" != "-1" ]; then
    NPROC=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .)
elif [ -z "${CUDA_VISIBLE_DEVICES+set}" ] && command -v nvidia-smi >/dev/null 2>&1 \
        && GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ') && [ "$GPUS" -gt 0 ]; then
    NPROC=$GPUS
else
    NPROC=2
fi
ARGS=("$@")
[[ " $* " == *" -c "* || " $* " == *" --config "* ]] || ARGS=(-c "$REPO/configs/default.yaml" "${ARGS[@]}")

# Pre-flight: the master's port must be free on node 0, where OneFlow's control server binds it
# (a taken port otherwise ends in a C++ stack trace from every process, or a hang).
if [ "$NODE_RANK" = "0" ]; then
    if ! "$PY" -c "import socket, sys
s = socket.socket()
try:
    s.bind(('', int(sys.argv[1])))
except OSError as e:
    sys.exit(f'error: master port {sys.argv[1]} (MASTER=$MASTER) is already in use ({e.strerror}); '
             'stop the other run or pick another port, e.g. MASTER=127.0.0.1:12539')" "${MASTER##*:}"; then
        exit 2
    fi
fi
echo "launching $NPROC process(es) on node $NODE_RANK of $NNODES (master $MASTER)" >&2
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" -m of_face.train.launch \
    --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC" --master "$MASTER" \
    "${ARGS[@]}"
