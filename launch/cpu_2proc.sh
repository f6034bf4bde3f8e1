#!/usr/bin/env bash
# Two training processes on one CPU machine (gloo backend): the whole distributed path without a GPU.
#
# From the repository root:
#   bash launch/cpu_2proc.sh configs/builtin.yaml data.batch_size=64 train.steps=200
#   bash launch/cpu_2proc.sh configs/builtin.yaml train.steps=400 --resume latest
# which runs:
#   OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m trainer.train --config CONFIG [ARGS...]
#
# NPROC=4 changes the number of processes. One thread per process: more would oversubscribe the cores
# (measured 3x slower with 2 processes on 2 cores).
# SIGTERM or SIGUSR1 to this script reaches every rank of this node as SIGUSR1 (launch/forward_signals.sh):
# the ranks checkpoint at the next step and exit 0; continue with --resume latest.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 CONFIG [section.key=value ...] [--resume latest]" >&2
    exit 2
fi
config=$1
shift
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

source "$repo/launch/preflight.sh"
if [[ -n ${NPROC+set} ]]; then check_count NPROC 1 || exit 2; fi
preflight --config "$config" "$@" || exit $?  # a bad config: one line, exit 2, before any rank starts
source "$repo/launch/forward_signals.sh"
run_forwarding_signals ranks torchrun --standalone --nproc_per_node "${NPROC:-2}" -m trainer.train --config "$config" "$@"
