#!/usr/bin/env bash
# The deepspeed launcher across the nodes of a hostfile (see launch/hostfile.example).
#
# From the repository root, on the first node of the hostfile, with passwordless ssh to every node and pdsh:
#   HOSTFILE=launch/hostfile bash launch/deepspeed_hostfile.sh configs/builtin.yaml data.batch_size=256
#   HOSTFILE=launch/hostfile bash launch/deepspeed_hostfile.sh configs/builtin.yaml --resume latest
# which runs:
#   deepspeed --hostfile $HOSTFILE --master_addr $MASTER_ADDR --master_port $MASTER_PORT \
#       --module trainer.train --config CONFIG [ARGS...]
# Without ssh between nodes: run the same command on every node with NODE_RANK=i (its line in the hostfile,
# from 0); it adds `--no_ssh --node_rank i`, and each node starts only its own processes.
#
# Environment: HOSTFILE (default launch/hostfile), MASTER_ADDR (default: the first host of the hostfile; it
# must be reachable from every node), MASTER_PORT (default 29500), LAUNCHER (pdsh, openmpi, mvapich, slurm;
# default pdsh), NODE_RANK (see above).
# The launcher forwards NCCL_* and PYTHON* variables to the other nodes; anything else they need (OMP_NUM_THREADS,
# PATH of the virtual environment, NCCL interface) goes in ~/.deepspeed_env or ./.deepspeed_env, one KEY=VALUE
# per line, no comments or blank lines (DeepSpeed splits every line on "="): see launch/deepspeed_env.example.
# Every node needs the repository and the Python environment at the same paths, and the shards and run folder
# on a shared filesystem.
#
# One machine: `deepspeed --num_gpus 2 --module trainer.train --config CONFIG ...` (no hostfile). On a CPU
# machine that is the form that works: `--include localhost:0,1` fails there (DeepSpeed counts one "device"
# per NUMA node), and the launcher does not set OMP_NUM_THREADS (set it to cores / processes).
# SIGTERM or SIGUSR1 to this script reaches every rank of this node as SIGUSR1 (launch/forward_signals.sh):
# the ranks checkpoint at the next step and exit 0; continue with --resume latest.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: HOSTFILE=path [MASTER_ADDR=host] [MASTER_PORT=port] [NODE_RANK=i] $0 CONFIG [ARGS...]" >&2
    exit 2
fi
config=$1
shift
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
hostfile=${HOSTFILE:-$repo/launch/hostfile}
if [[ ! -f $hostfile ]]; then
    echo "$0: hostfile $hostfile not found (copy launch/hostfile.example and list your nodes)" >&2
    exit 2
fi
master_addr=${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$hostfile")}
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

source "$repo/launch/preflight.sh"
if [[ -n ${NODE_RANK+set} ]]; then check_count NODE_RANK 0 "" "this node's line in the hostfile, from 0" || exit 2; fi
if [[ -n ${MASTER_PORT+set} ]]; then check_count MASTER_PORT 1 65535 || exit 2; fi
args=(--hostfile "$hostfile" --master_addr "$master_addr" --master_port "${MASTER_PORT:-29500}")
if [[ -n ${NODE_RANK:-} ]]; then
    args+=(--no_ssh --node_rank "$NODE_RANK")
else
    args+=(--launcher "${LAUNCHER:-pdsh}")
fi
preflight --config "$config" "$@" || exit $?  # a bad config: one line, exit 2, before any rank starts
source "$repo/launch/forward_signals.sh"
run_forwarding_signals ranks deepspeed "${args[@]}" --module trainer.train --config "$config" "$@"
