#!/usr/bin/env bash
# Fetch, where the network is, the wheels an offline GPU node with PyTorch preinstalled needs to
# run longva and its GPU suite (benchmarks/gpu/run.sh), and nothing it already has.
#
#   bash benchmarks/gpu/wheels.sh [--python 3.12] [--out DIR]      (default DIR: benchmarks/gpu/wheels)
#
# Run it with the project's virtual environment active: DeepSpeed's sdist is built here, and its
# setup.py imports torch.
#
# Designed for the typical GPU image (the lent device machine is one): Python 3.12, torch 2.11
# (CUDA 13), transformers 5.17, accelerate, huggingface_hub, safetensors, tokenizers, typer, rich,
# pyyaml, tqdm, numpy, pillow, pytest, and DeepSpeed's einops, msgpack, ninja, packaging, psutil,
# py-cpuinfo. What such a node lacks, and so what lands in DIR:
#
#   av                 PyAV with its own FFmpeg: video decoding (decord has no Python 3.12 wheel)
#   deepspeed          extend-text and align. PyPI has only an sdist: built here with DS_BUILD_OPS=0
#                      into a pure-Python wheel; any op it needs is JIT-built on the node
#   torchao            `--quantize 4bit|8bit` (int4 weight-only through PyTorch's own tinygemm
#                      kernels): 3.2 MB, where bitsandbytes' wheel is 41 MB
#   pydantic, pydantic-core, annotated-types, typing-inspection, hjson
#                      what DeepSpeed imports beyond the above; pydantic 2.11 because it accepts
#                      the older typing-extensions a node image may carry (2.14 wants >= 4.16)
#
# longva itself is not a wheel here: run.sh installs it from the checkout it runs in, so the suite
# always tests the code beside it. flash-attn and bitsandbytes are left out on purpose: the suite
# measures what a node without them gets (their tests skip). The folder must stay under 64 MiB
# (it travels with the working tree to the device machine): the script fails if it does not.
#
# On the lent device machine, from this checkout (the folder is git-ignored, so it is carried):
#   run(command="bash benchmarks/gpu/run.sh --out $OUT", carry=["benchmarks/gpu/wheels"], timeout_s=540)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
python_version=3.12
out=$here/wheels
while [ $# -gt 0 ]; do
    case $1 in
        --python) python_version=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        -h | --help) sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "wheels.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
python=${PYTHON:-python}
limit_bytes=$((64 * 1024 * 1024))

# One version of each: two of a package in the folder stop the whole offline install.
BINARY=(av==18.1.0 torchao==0.18.0 pydantic==2.11.7 pydantic-core==2.33.2 annotated-types==0.7.0 typing-inspection==0.4.1 hjson==3.1.0)
DEEPSPEED=deepspeed==0.19.8

"$python" -c "import torch" 2>/dev/null || {
    echo "wheels.sh: $python cannot import torch, which DeepSpeed's build needs; activate the project's .venv (or set PYTHON)." >&2
    exit 1
}
mkdir -p "$out"
rm -f "$out"/*.whl

echo "downloading for CPython $python_version, manylinux x86_64: ${BINARY[*]}"
"$python" -m pip download --no-deps --only-binary=:all: --python-version "$python_version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --dest "$out" "${BINARY[@]}"

echo "building $DEEPSPEED as a pure-Python wheel (DS_BUILD_OPS=0)"
DS_BUILD_OPS=0 "$python" -m pip wheel --no-deps --no-cache-dir --no-build-isolation --no-binary deepspeed \
    --wheel-dir "$out" "$DEEPSPEED"

deepspeed_wheel=$(ls "$out"/deepspeed-*.whl)
case $deepspeed_wheel in
    *-py3-none-any.whl) ;;
    *) echo "wheels.sh: $deepspeed_wheel is not a pure-Python wheel; it would not install on the node." >&2; exit 1 ;;
esac
# pydantic pins its core exactly: a mismatch fails at import on the node, so fail here instead.
core_pin=$(unzip -p "$out"/pydantic-*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==\([^ ;]*\).*/\1/p')
ls "$out"/pydantic_core-"$core_pin"-*.whl >/dev/null 2>&1 || {
    echo "wheels.sh: pydantic needs pydantic-core $core_pin, which is not in $out; fix the pins at the top of this script." >&2
    exit 1
}

total=$(cat "$out"/*.whl | wc -c)
ls -l "$out"/*.whl | awk '{ printf "%10d  %s\n", $5, $NF }'
printf 'total %.1f MiB in %s\n' "$(echo "$total" | awk '{ print $1 / 1048576 }')" "$out"
if [ "$total" -gt "$limit_bytes" ]; then
    echo "wheels.sh: the wheels come to $total bytes, over the 64 MiB that travel to the GPU machine." >&2
    exit 1
fi
