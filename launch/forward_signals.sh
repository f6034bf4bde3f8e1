# Sourced by the launch scripts (not run on its own): start a launcher in the background and pass a
# preemption signal on, so that the training ranks checkpoint at the next step and exit 0 (trainer/training/loop.py).
#
#   run_forwarding_signals ranks torchrun ...   # SIGTERM/SIGUSR1 to this script -> SIGUSR1 to each local rank
#   run_forwarding_signals launcher srun ...    # -> SIGUSR1 to the launcher, which relays it (srun does)
#
# Why not just `exec LAUNCHER`: torchrun ignores SIGUSR1 (the default action kills it and leaves the ranks
# running unsignalled), and on SIGTERM torchrun and the deepspeed launcher kill the ranks after a grace period
# (30 s, 3 s) that a large checkpoint can exceed. Each rank writes its pid to $TRAINER_PID_DIR/rank<RANK>.pid
# when that folder exists; one signalled rank is enough, since the ranks agree on stopping by an all-reduce.
# The script's exit status is the launcher's: 0 when every rank checkpointed and exited 0.

_forward_to_ranks() {
    local pidfile
    for pidfile in "$TRAINER_PID_DIR"/rank*.pid; do
        [[ -f $pidfile ]] && kill -USR1 "$(cat "$pidfile")" 2>/dev/null
    done
    return 0
}

run_forwarding_signals() {
    local target=$1
    shift
    local own_dir=""
    if [[ -z ${TRAINER_PID_DIR:-} ]]; then
        own_dir=$(mktemp -d)
        export TRAINER_PID_DIR=$own_dir
    fi
    "$@" &
    local child=$!
    if [[ $target == ranks ]]; then
        trap '_forward_to_ranks' TERM USR1
    else
        trap "kill -USR1 $child 2>/dev/null" TERM USR1
    fi
    local status
    while :; do
        status=0
        wait "$child" || status=$?  # (set -e must not end the script when a signal interrupts wait)
        kill -0 "$child" 2>/dev/null || break  # still running (or not yet reaped): wait was cut short by a signal
    done
    # A signal that cut `wait` short just as the launcher ended leaves 128 + signal in status, not the launcher's
    # own: bash keeps the status of a child it reaped, and a second wait returns it.
    if (( status > 128 )); then
        status=0
        wait "$child" 2>/dev/null || status=$?
    fi
    trap - TERM USR1
    [[ -n $own_dir ]] && rm -rf "$own_dir"
    return "$status"
}
