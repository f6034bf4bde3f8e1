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
