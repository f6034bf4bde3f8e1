#!/usr/bin/env bash
# A GPU check you can run in minutes (a budget of 8 on one GPU): NCCL group and the collective path at world size
# 1, ZeRO 0/2/3 x fp32/bf16 with evaluation, checkpoint save and resume, engine.compile, bench/step.py throughput.
# Writes a table, one JSON line and the parts' output as it goes (bench/gpu_check.py has the details).
#
#   bash bench/gpu_check.sh --kit .gpukit    # a bare GPU machine (a lease): the kit of bench/gpu_kit.sh, built on
#                                            # a CPU machine, holds the wheels and the shard set; docs/gpu_check.md
#   bash bench/gpu_check.sh                  # a GPU machine with the project installed (make install)
#   PYTHON=.venv/bin/python bash bench/gpu_check.sh --steps 40
#
# With --kit: refuses in one line (exit 2) where torch sees no CUDA device, before installing anything; else
# installs the kit's wheels into KIT/site (pip --no-index --no-deps --target: the machine's own torch, numpy, ...
# stay in use, whatever their version), checks that the check's imports load, and runs the check on KIT/shards.
# Any other option goes to bench/gpu_check.py (--out DIR, --only PART,PART, --budget-s S, --steps N, ...).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
py=${PYTHON:-$(command -v python3 || command -v python || echo python3)}

refuse() { echo "gpu_check: error: $*" >&2; exit 2; }

kit=""
args=()
while (($#)); do
  case $1 in
    --kit) [[ $# -ge 2 ]] || refuse "--kit needs a folder (bash bench/gpu_kit.sh builds .gpukit)"; kit=$2; shift 2 ;;
    --kit=*) kit=${1#--kit=}; shift ;;
    *) args+=("$1"); shift ;;
  esac
done

if [[ -z $kit ]]; then
  export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
  exec "$py" bench/gpu_check.py ${args[@]+"${args[@]}"}
fi

# CUDA first: the kit is for a GPU machine, and on any other nothing is installed.
probe=$("$py" -c 'import torch; print(torch.__version__, torch.cuda.is_available())' 2>/dev/null) \
  || refuse "$py cannot import torch; --kit is for the GPU machine, whose python3 has a CUDA torch"
read -r torch_version cuda_seen <<<"$probe"
[[ $cuda_seen == True ]] || refuse "no CUDA device here (torch $torch_version sees none); --kit is for the GPU machine"

kit=$(cd "$kit" 2>/dev/null && pwd) || refuse "no kit folder $kit; build it here with: bash bench/gpu_kit.sh"
shopt -s nullglob
wheels=("$kit"/wheels/*.whl)
((${#wheels[@]})) || refuse "$kit/wheels holds no wheels; rebuild the kit with: bash bench/gpu_kit.sh"
[[ -f $kit/shards/manifest.json ]] || refuse "$kit/shards is no shard set; rebuild the kit with: bash bench/gpu_kit.sh"

# Installed once per machine: the wheels' names are the stamp (a carried kit replaces KIT/site, so a fresh copy
# installs again). --no-deps: every wheel the check needs is in the kit, the rest is the machine's own.
site=$kit/site
stamp=$(printf '%s\n' "${wheels[@]##*/}")
if [[ ! -f $site/.gpukit-installed || $(cat "$site/.gpukit-installed") != "$stamp" ]]; then
  start=$SECONDS
  "$py" -m pip install -q --no-index --find-links "$kit/wheels" --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "${wheels[@]}" >"$kit/install.log" 2>&1 \
    || { tail -5 "$kit/install.log" >&2; echo "gpu_check: installing the kit failed ($kit/install.log)" >&2; exit 1; }
  printf '%s\n' "$stamp" >"$site/.gpukit-installed"
  echo "gpu_check: installed ${#wheels[@]} wheels into $site in $((SECONDS - start)) s"
fi
export PYTHONPATH="$repo:$site${PYTHONPATH:+:$PYTHONPATH}"

# Every import of the check, in one process: a missing one shows here in seconds, not in each part.
"$py" -c '
import sys, torch, deepspeed, webdataset, pydantic
import trainer.train, trainer.distributed  # the entry points the check runs (-m, the probe), all they import
print(f"gpu_check: python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"deepspeed {deepspeed.__version__}, webdataset {webdataset.__version__}, pydantic {pydantic.VERSION}, "
      f"{torch.cuda.get_device_name(0)}")
' || { echo "gpu_check: the check's imports fail with the kit installed (see above)" >&2; exit 1; }

exec "$py" bench/gpu_check.py --shards "$kit/shards" ${args[@]+"${args[@]}"}
