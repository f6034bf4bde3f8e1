#!/usr/bin/env bash
# The kit for a lease of a bare GPU machine (no registry there, 64 MiB carried at most): run HERE, on a machine
# whose pip reaches the registry, then carry the folder (docs/gpu_check.md gives the device call).
#
#   PYTHON=.venv/bin/python bash bench/gpu_kit.sh           # builds .gpukit/ (git ignores it)
#   bash bench/gpu_kit.sh --kit DIR                          # elsewhere
#   bash bench/gpu_kit.sh --shards-only                      # the shard set alone (no download)
#
# KIT/wheels: a wheel for CPython 3.12 / manylinux x86-64 of each [kit] line of bench/gpu_kit_manifest.txt (what
# the check imports that the GPU machine lacks; a source-only release is built into a wheel here), and nothing
# else (a wheel no line names is removed: two versions of one package would stop the install there).
# KIT/shards: the check's shard set (bench/gpu_check.py --build-shards), built here so the GPU machine needs no
# spaCy. Prints the kit's size. Idempotent: what is there already is kept, and a complete kit needs no network.
# Refuses in one line (exit 2) when pip cannot fetch a wheel or PYTHON cannot build shards.
# PYTHON: the project's environment (it builds the shards; its pip fetches the wheels); default .venv/bin/python.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
manifest=$repo/bench/gpu_kit_manifest.txt
max_mib=40  # of the 64 MiB a call carries: the working tree travels too, and a kit must leave room to grow
# pip matches each manylinux tag exactly: the ones CPython 3.12 wheels on the registry carry
platforms=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)

refuse() { echo "gpu_kit: error: $*" >&2; exit 2; }

kit=$repo/.gpukit
shards_only=0
while (($#)); do
  case $1 in
    --kit) [[ $# -ge 2 ]] || refuse "--kit needs a folder"; kit=$2; shift 2 ;;
    --shards-only) shards_only=1; shift ;;
    *) refuse "unknown option $1 (options: --kit DIR, --shards-only)" ;;
  esac
done
if [[ -n ${PYTHON:-} ]]; then py=$PYTHON
elif [[ -x $repo/.venv/bin/python ]]; then py=$repo/.venv/bin/python
else py=python3
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

"$py" -c 'import spacy, webdataset, shards' 2>/dev/null \
  || refuse "$py cannot build shards (spaCy, webdataset missing?); set PYTHON to the project's environment"
mkdir -p "$kit/wheels"
kit=$(cd "$kit" && pwd)
log=$kit/build.log
: >"$log"
start=$SECONDS

# The [kit] section: "REQUIREMENT [import=...] [sdist]", comments stripped.
kit_lines() { awk '/^\[/ { section = $1; next } section == "[kit]" { sub(/#.*/, ""); if (NF) print }' "$manifest"; }

# A wheel's file name starts with the distribution's name (case and runs of -_. folded to _) and the version.
wheel_prefix() {
  local name=${1%%==*}
  name=$(tr 'A-Z' 'a-z' <<<"$name" | sed -E 's/[-_.]+/_/g')
  echo "$name-${1#*==}-"
}

have_wheel() {
  local prefix f
  prefix=$(wheel_prefix "$1")
  for f in "$kit"/wheels/*.whl; do
    [[ -e $f ]] || continue
    [[ $(tr 'A-Z' 'a-z' <<<"${f##*/}") == "$prefix"* ]] && return 0
  done
  return 1
}

fetch_wheels() {
  local req flags binary=() source=() tmp
  while read -r req flags; do
    [[ $req == *==* ]] || refuse "$manifest: '$req' pins no version (NAME==VERSION)"
    have_wheel "$req" && continue
    if [[ " $flags " == *" sdist "* ]]; then source+=("$req"); else binary+=("$req"); fi
  done < <(kit_lines)
  if ((${#binary[@]})); then
    echo "gpu_kit: fetching ${binary[*]}"
    "$py" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${platforms[@]/#/--platform=}" -d "$kit/wheels" "${binary[@]}" >>"$log" 2>&1 \
      || refuse "pip could not fetch ${binary[*]} for CPython 3.12 (no registry reached?); see $log"
  fi
  for req in ${source[@]+"${source[@]}"}; do
    echo "gpu_kit: building a wheel of $req from its source (seconds)"
    tmp=$(mktemp -d)
    # DS_BUILD_OPS=0: DeepSpeed compiles no op ahead (those it needs it builds at run time; the check needs none)
    DS_BUILD_OPS=0 "$py" -m pip wheel --no-cache-dir --no-deps --no-binary="${req%%==*}" -w "$tmp" "$req" \
      >>"$log" 2>&1 \
      || { rm -rf "$tmp"; refuse "pip could not fetch or build $req (no registry reached?); see $log"; }
    for f in "$tmp"/*.whl; do
      [[ $f == *-py3-none-any.whl ]] || { rm -rf "$tmp"; refuse "$req built ${f##*/}, not a pure-Python wheel"; }
      mv "$f" "$kit/wheels/"
    done
    rm -rf "$tmp"
  done
}

prune_wheels() {
  local f keep prefix req flags
  for f in "$kit"/wheels/*.whl; do
    [[ -e $f ]] || continue
    keep=0
    while read -r req flags; do
      prefix=$(wheel_prefix "$req")
      [[ $(tr 'A-Z' 'a-z' <<<"${f##*/}") == "$prefix"* ]] && keep=1
    done < <(kit_lines)
    ((keep)) || { echo "gpu_kit: removing ${f##*/} (no [kit] line names it)"; rm -f "$f"; }
  done
}

if ((!shards_only)); then
  fetch_wheels
  prune_wheels
fi
"$py" bench/gpu_check.py --build-shards "$kit/shards" || refuse "building the shard set failed; see $kit/shards.log"
# What the GPU machine makes of a kit (its installed copy, its install log) is no part of one.
rm -rf "$kit/site" "$kit/install.log" "$kit/shards.partial"

{ echo "# built by bench/gpu_kit.sh on $(date -u +%FT%TZ) from $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  (cd "$kit" && ls wheels) | sed 's/^/wheels\//'
  echo "shards: $(cat "$kit/shards/.gpu_check-shards")"; } >"$kit/KIT.txt"
bytes=$(du -sb "$kit" | cut -f1)
mib=$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }')
echo "gpu_kit: $kit: $(ls "$kit"/wheels | wc -l) wheels, shards $(du -sh "$kit/shards" | cut -f1), $mib MiB in all" \
     "(limit $max_mib of the 64 MiB a call carries), $((SECONDS - start)) s"
((bytes <= max_mib * 1048576)) || { echo "gpu_kit: the kit is over $max_mib MiB: trim it" >&2; exit 1; }
