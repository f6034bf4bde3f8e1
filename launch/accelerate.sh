#!/usr/bin/env bash
# `accelerate launch --use_deepspeed`, for clusters that standardise on Accelerate's launcher.
#
# From the repository root:
#   NUM_PROCESSES=8 bash launch/accelerate.sh configs/builtin.yaml data.batch_size=256        # one node, 8 GPUs
#   NUM_MACHINES=2 MACHINE_RANK=0 MAIN_PROCESS_IP=10.0.0.1 NUM_PROCESSES=16 \
#       bash launch/accelerate.sh configs/builtin.yaml data.batch_size=256                    # on each node
# which runs:
#   accelerate launch --use_deepspeed --num_processes $NUM_PROCESSES --num_machines $NUM_MACHINES \
#       --machine_rank $MACHINE_RANK --main_process_ip $MAIN_PROCESS_IP --main_process_port $MAIN_PROCESS_PORT \
#       --deepspeed_multinode_launcher standard --mixed_precision no --dynamo_backend no \
#       -m trainer.train --config CONFIG [ARGS...]
#
# NUM_PROCESSES counts every process of every machine. Accelerate only starts the processes (torchrun
# underneath): the trainer calls deepspeed.initialize itself with the JSON named by the YAML's
# engine.deepspeed_config, and the precision is engine.precision; Accelerate's --zero_stage,
# --deepspeed_config_file and `accelerate config` answers are not read.
# On a machine without GPUs this runs gloo processes as it is; do not add --cpu (with --num_processes > 1 it
# silently starts one process, since it expects MPI) nor ACCELERATE_USE_CPU=1 (it drops DeepSpeed).
# SIGTERM or SIGUSR1 to this script reaches every rank of this node as SIGUSR1 (launch/forward_signals.sh):
# the ranks checkpoint at the next step and exit 0; continue with --resume latest.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: NUM_PROCESSES=N [NUM_MACHINES=M MACHINE_RANK=i MAIN_PROCESS_IP=host] $0 CONFIG [ARGS...]" >&2
    exit 2
fi
config=$1
shift
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
num_machines=${NUM_MACHINES:-1}
if [[ -z ${NUM_PROCESSES:-} ]]; then
    echo "$0: set NUM_PROCESSES (processes on all machines together)" >&2
    exit 2
fi

source "$repo/launch/preflight.sh"
check_count NUM_PROCESSES 1 "" "processes on all machines together" || exit 2
if [[ -n ${NUM_MACHINES+set} ]]; then check_count NUM_MACHINES 1 || exit 2; fi
if [[ -n ${MACHINE_RANK+set} ]]; then
    check_count MACHINE_RANK 0 $((10#$num_machines - 1)) "each machine's own number, 0 .. NUM_MACHINES-1" || exit 2
fi
if [[ -n ${MAIN_PROCESS_PORT+set} ]]; then check_count MAIN_PROCESS_PORT 1 65535 || exit 2; fi
preflight --config "$config" "$@" || exit $?  # a bad config: one line, exit 2, before any rank starts
source "$repo/launch/forward_signals.sh"
run_forwarding_signals ranks accelerate launch --use_deepspeed --num_processes "$NUM_PROCESSES" --num_machines "$num_machines" \
    --machine_rank "${MACHINE_RANK:-0}" --main_process_ip "${MAIN_PROCESS_IP:-127.0.0.1}" \
    --main_process_port "${MAIN_PROCESS_PORT:-29500}" --deepspeed_multinode_launcher standard \
    --mixed_precision no --dynamo_backend no \
    -m trainer.train --config "$config" "$@"
