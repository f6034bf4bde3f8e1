#!/usr/bin/env bash
# torchrun on several nodes: run the same command on every node, with NODE_RANK 0 .. NNODES-1.
#
# From the repository root (a shared filesystem, or the same paths, on every node):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 bash launch/torchrun_multinode.sh \
#       configs/builtin.yaml data.batch_size=256               # on node 0 (10.0.0.1)
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 bash launch/torchrun_multinode.sh \
#       configs/builtin.yaml data.batch_size=256               # on node 1
# which runs, on each node:
#   torchrun --nnodes $NNODES --node_rank $NODE_RANK --master_addr $MASTER_ADDR --master_port $MASTER_PORT \
#       --nproc_per_node $NPROC_PER_NODE -m trainer.train --config CONFIG [ARGS...]
#
# NPROC_PER_NODE: processes per node, default one per GPU (torchrun's "gpu"), 1 on a machine without GPUs.
# MASTER_ADDR is node 0's address, reachable from every node; MASTER_PORT a free TCP port there.
# Resume a stopped run: the same commands with --resume latest appended.
# SIGTERM or SIGUSR1 to this script reaches every rank of this node as SIGUSR1 (launch/forward_signals.sh):
# the ranks checkpoint at the next step and exit 0; continue with --resume latest.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: NNODES=N NODE_RANK=i MASTER_ADDR=host [MASTER_PORT=29500] [NPROC_PER_NODE=k] $0 CONFIG [ARGS...]" >&2
    exit 2
fi
# each missing variable: one line and exit 2 (bash's own ${VAR:?} check would exit 1)
for pair in "NNODES=number of nodes" "NODE_RANK=0 .. NNODES-1" "MASTER_ADDR=address of node 0"; do
    name=${pair%%=*}
    if [[ -z ${!name:-} ]]; then
        echo "$0: set $name (${pair#*=})" >&2
        exit 2
    fi
done
config=$1
shift
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
source "$repo/launch/preflight.sh"
check_count NNODES 1 || exit 2
check_count NODE_RANK 0 $((10#$NNODES - 1)) "each node's own number, 0 .. NNODES-1" || exit 2
if [[ -n ${NPROC_PER_NODE:-} && $NPROC_PER_NODE != gpu ]]; then check_count NPROC_PER_NODE 1 "" "or gpu" || exit 2; fi
if [[ -n ${MASTER_PORT:-} ]]; then check_count MASTER_PORT 1 65535 || exit 2; fi
if [[ -z ${NPROC_PER_NODE:-} ]]; then
    if command -v nvidia-smi >/dev/null 2>&1; then NPROC_PER_NODE=gpu; else NPROC_PER_NODE=1; fi
fi

preflight --config "$config" "$@" || exit $?  # a bad config: one line, exit 2, before any rank starts
source "$repo/launch/forward_signals.sh"
run_forwarding_signals ranks torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" \
    --master_port "${MASTER_PORT:-29500}" --nproc_per_node "$NPROC_PER_NODE" \
    -m trainer.train --config "$config" "$@"
