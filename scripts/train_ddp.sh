#!/usr/bin/env bash
# Launch training on every process of this node through OneFlow's launcher.
#
#   bash scripts/train_ddp.sh [-c CONFIG] [-o Section.key=value ...]
#
# Multi-node (run the same command on every node):
#   NNODES=2 NODE_RANK=0 MASTER=10.0.0.1:12538 CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 bash scripts/train_ddp.sh -c ...
#   NNODES=2 NODE_RANK=1 MASTER=10.0.0.1:12538 CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 bash scripts/train_ddp.sh -c ...
# Processes per node: one per visible GPU, or NPROC_PER_NODE (default 2) on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-$(bash scripts/setup.sh)}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER=${MASTER:-127.0.0.1:12538}
if [ -n "${NPROC_PER_NODE:-}" ]; then
    NPROC=$NPROC_PER_NODE
elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    NPROC=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .)
else
    NPROC=2
fi
ARGS=("$@")
[[ " $* " == *" -c "* || " $* " == *" --config "* ]] || ARGS=(-c configs/default.yaml "${ARGS[@]}")

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
exec "$PY" -m oneflow.distributed.launch \
    --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC" \
    --master_addr "${MASTER%:*}" --master_port "${MASTER##*:}" \
    -m of_face.train.main "${ARGS[@]}"
