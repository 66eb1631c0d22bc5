#!/usr/bin/env bash
# GPU evidence for longva in one command, offline, within nine minutes on one GPU.
#
#   bash benchmarks/gpu/run.sh [--out DIR] [--wheels DIR] [--stages LIST] [--budget STAGE=SECONDS] [--overwrite] [--cpu-dry-run]
#
# Installs longva (from this checkout) and the wheels that `benchmarks/gpu/wheels.sh` fetched
# (default benchmarks/gpu/wheels/) into a temporary folder with no network, then runs, each
# under its own time limit:
#
#   install  pip --no-index into a temporary --target; records GPU, driver and versions
#   pytest   pytest -m gpu tests/model/test_gpu.py: bf16 default, mask-free SDPA vs eager,
#            flash-attention and 4/8-bit where installed, --device-map auto
#   train    extend-text steps at 32K tokens, Qwen2-0.5B shape, ZeRO-2, one GPU
#   scale    LongVA-7B shape, random bf16 weights built on the GPU: the card's matmul peak and
#            copy bandwidth, ask about 1000 and 3000 frames (144K, 432K tokens) with the
#            measured attention kernels, then two teacher-forced V-NIAH cells at 3000 frames
#   fit24    (only when --stages names it) the process capped at 24 GiB: `ask --frames 3000
#            --memory-budget 22.5GiB` through the memory plan, then one V-NIAH cell if time is left
#
# Every stage writes its figures to DIR/gpu-results.json (atomically) as soon as it has them,
# and its output to DIR/<stage>.log, so a run cut short still reports what it measured.
# A folder that already holds results is refused unless --overwrite replaces them, or
# --stages pytest,scale reruns only those stages into it (install always runs; the other stages'
# figures and logs stay). --budget train=240 changes one stage's time limit (repeatable).
# --cpu-dry-run runs the same stages, fit24 included, with tiny shapes on the CPU (about a
# minute) and is what CI runs (tests/test_gpu_suite.py). PYTHON picks the interpreter (default python3).
# Exit status: 0 when every stage finished and passed, 1 otherwise.
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=gpu-results
wheels=$here/wheels
dry_run=0
stages=
partial=0
overwrite=0
budget_overrides=()
while [ $# -gt 0 ]; do
    case $1 in
        --out) out=$2; shift 2 ;;
        --wheels) wheels=$2; shift 2 ;;
        --stages) stages=$2; partial=1; shift 2 ;;
        --overwrite) overwrite=1; shift ;;
        --budget) budget_overrides+=("$2"); shift 2 ;;
        --cpu-dry-run) dry_run=1; shift ;;
        -h | --help) sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
# Seconds each stage may take: under 9 minutes in all on a GPU.
# fit24 is not in a GPU run's default list: with it a run would take 17 minutes, past the 9 a
# device call may use; it runs alone (`--stages fit24`: 8.5 minutes with the install).
if [ -z "$stages" ]; then
    stages=pytest,train,scale
    [ "$dry_run" = 0 ] || stages=$stages,fit24
fi
if [ "$dry_run" = 1 ]; then
    mode=cpu-dry-run tiny=--tiny
    declare -A budget=([install]=60 [pytest]=60 [train]=180 [scale]=90 [fit24]=90)
    export CUDA_VISIBLE_DEVICES=""
else
    mode=gpu tiny=
    declare -A budget=([install]=25 [pytest]=45 [train]=80 [scale]=380 [fit24]=480)
fi
for name in ${stages//,/ }; do
    if [ "$name" = install ] || [ -z "${budget[$name]+set}" ]; then
        echo "run.sh: --stages takes pytest, train, scale and fit24 (comma-separated), not '$name'" >&2; exit 2
    fi
done
for override in ${budget_overrides[@]+"${budget_overrides[@]}"}; do
    name=${override%%=*} seconds=${override#*=}
    if [ -z "${budget[$name]+set}" ] || ! [[ $seconds =~ ^[1-9][0-9]*$ ]]; then
        echo "run.sh: --budget takes STAGE=SECONDS (install, pytest, train, scale or fit24; whole seconds), not '$override'" >&2; exit 2
    fi
    budget[$name]=$seconds
done
python=${PYTHON:-python3}
mkdir -p "$out" && out=$(cd "$out" && pwd)
results=$out/gpu-results.json
if [ "$partial" = 1 ]; then
    for name in install ${stages//,/ }; do rm -f "$out/$name.log"; done
elif [ -f "$results" ] && [ "$overwrite" = 0 ]; then
    echo "run.sh: $results holds an earlier run; add --overwrite to replace it, or --stages to rerun some stages into it" >&2; exit 2
else
    rm -f "$results" "$out"/*.log
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/longva-gpu-suite.XXXXXX")
trap 'rm -rf "$work"' EXIT

export HF_HUB_OFFLINE=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# The KV cache grows chunk by chunk: expandable segments keep the allocator from fragmenting.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
site=$work/site
export PYTHONPATH=$site:$here${PYTHONPATH:+:$PYTHONPATH}
export PATH=$site/bin:$PATH
cd "$repo" || exit 1

record() { "$python" "$here/record.py" "$@"; }

install() {
    local found=()
    shopt -s nullglob
    found=("$wheels"/*.whl)
    if [ ${#found[@]} -gt 0 ]; then
        echo "wheels from $wheels: ${found[*]##*/}"
        "$python" -m pip install --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${found[@]}" || return 1
    else
        echo "no wheels in $wheels: using what the interpreter already has (fetch them with benchmarks/gpu/wheels.sh)"
    fi
    # longva itself from this checkout, so the suite always tests the code beside it; built from a
    # copy because setuptools' build/ folder in the checkout can hold modules deleted since
    mkdir -p "$site.src" && cp -r "$repo/pyproject.toml" "$repo/README.md" "$repo/longva_cli" "$repo/recipes" "$site.src/" || return 1
    "$python" -m pip install --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --target "$site" "$site.src" || return 1
    "$python" -c "import av, deepspeed, longva_cli; print('imports: av', av.__version__, 'deepspeed', deepspeed.__version__)" || return 1
    record environment "$results" --mode "$mode"
}

pytest_stage() {
    rm -f "$out/pytest-gpu.xml"  # never read an earlier run's outcomes
    "$python" -m pytest -q -m gpu tests/model/test_gpu.py -p no:cacheprovider --junitxml "$out/pytest-gpu.xml"
    local rc=$?
    record pytest "$results" "$out/pytest-gpu.xml"
    return $rc
}

# `timeout` runs programs, not shell functions: the stages below run in `bash -c` with these.
export python here repo site wheels results out mode
export -f record install pytest_stage

failures=0
suite_started=$(date +%s)
stage() {  # stage NAME COMMAND...: run under the stage's time limit, log it, record its status
    local name=$1 limit=${budget[$1]} started rc status seconds
    shift
    [ "$name" = install ] || [[ ",$stages," == *",$name,"* ]] || return 0
    record stage "$results" "$name" --status running --budget "$limit" --fresh
    started=$(date +%s%N)
    # SIGINT first: Python unwinds, so torch releases the lock of a JIT build it was cut off in
    # (a SIGTERM'd build leaves it, and every later DeepSpeed start waits on it for ever)
    timeout --signal=INT --kill-after=15 "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    seconds=$(awk "BEGIN { print ($(date +%s%N) - $started) / 1e9 }")
    case $rc in
        0) status=ok ;;
        124 | 137) status="timed out after ${limit} s" ;;
        *) status="failed (exit $rc)" ;;
    esac
    [ "$rc" = 0 ] || failures=$((failures + 1))
    record stage "$results" "$name" --status "$status" --seconds "$seconds" --budget "$limit"
    printf '%-8s %-26s %6.1f s  %s\n' "$name" "$status" "$seconds" "$out/$name.log"
}

record stage "$results" suite --status running --fresh
stage install bash -c install
stage pytest bash -c pytest_stage
stage train "$python" "$here/train.py" --results "$results" --work "$work/train" $tiny
stage scale "$python" "$here/scale.py" --results "$results" --work "$work/scale" --deadline $(($(date +%s) + budget[scale])) $tiny
stage fit24 "$python" "$here/fit24.py" --results "$results" --work "$work/fit24" --deadline $(($(date +%s) + budget[fit24])) $tiny
elapsed=$(($(date +%s) - suite_started))
record stage "$results" suite --status "$([ "$failures" = 0 ] && echo ok || echo "$failures stage(s) did not pass")" --seconds "$elapsed"
echo "suite ($mode): ${elapsed} s, results in $results"
cat "$results"
[ "$failures" = 0 ]
