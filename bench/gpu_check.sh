#!/usr/bin/env bash
# A GPU check you can run in minutes (under 8 on one GPU): NCCL group and the collective path at world size 1,
# ZeRO 0/2/3 x fp32/bf16, evaluation, checkpoint save and resume, torch.compile, bench/step.py throughput.
# Prints a table and one JSON line (bench/gpu_check.py has the details). From the repository root, with the
# project installed (make install, or pip install -e . beside a CUDA torch):
#   bash bench/gpu_check.sh
#   PYTHON=.venv/bin/python bash bench/gpu_check.sh --steps 40
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" bench/gpu_check.py "$@"
