# Sourced by the launch scripts: check the trainer's arguments once, before a launcher starts any rank.
#
# A refused config inside torchrun's or deepspeed's ranks ends as the launcher's multi-line failure report
# (ChildFailedError, exit 1) repeated per rank; checked here it is one line and exit 2 (trainer.train_args:
# no torch import, about 0.2 s). Only the config is checked: checkpoints (--resume) are the ranks' business.

preflight() {
    local py=${PYTHON:-}
    if [[ -z $py ]]; then
        py=$(command -v python || command -v python3 || true)
    fi
    if [[ -z $py ]]; then
        return 0  # no interpreter on PATH here: the ranks check the config themselves
    fi
    "$py" -m trainer.train_args "$@"
}

# A launcher variable that must be a whole number in MIN .. MAX (MAX optional): one line and status 2 otherwise.
# Unchecked, torchrun takes NODE_RANK=5 of NNODES=2 and waits forever for nodes that never come, and NNODES=two
# or NPROC=0 end in a launcher's traceback.
check_count() {  # NAME MIN [MAX] [WHY]
    local name=$1 min=$2 max=${3:-} why=${4:-}
    local value=${!1-} range=">= $2"
    if [[ -n $max ]]; then range="in $min .. $max"; fi
    if [[ ! $value =~ ^[0-9]{1,9}$ ]] || (( 10#$value < min )) || { [[ -n $max ]] && (( 10#$value > max )); }; then
        echo "$0: $name=$value must be a whole number $range${why:+ ($why)}" >&2
        return 2
    fi
}
