#!/usr/bin/env bash
# Everything one GPU lease should do, in one go (about 6 minutes at most), run from the repository root:
#
#   bash benchmarks/device.sh             # on the GPU machine; results in $OUT (default: ./out)
#   bash benchmarks/device.sh --sdxl      # the SDXL case, as a second call on the same warm machine
#   bash benchmarks/device.sh --dry-run [--sdxl]   # here, without a GPU: every stage that can run without one
#
# Stages, each under its own timeout, each writing its file to $OUT as soon as it completes (8 files at most):
#   install   the wheels of .whl/ (benchmarks/device-wheels.sh) whose distributions the machine lacks -> env.txt
#   env       nvidia-smi, the driver's CUDA version, Python package versions                        -> env.txt
#   gpu       pytest -m gpu tests/gpu (the plumbing test apart)                                    -> gpu-tests.xml, .log
#   plumbing  the TensorRT backend's CUDA plumbing over a cupy stand-in engine (not TensorRT itself) -> plumbing.xml
#   bench     python -m benchmarks.gpu --steps 50 --runs 3 (SD 1.5 shapes, 512x512)                  -> bench.json, .md
# and stages.txt: one line per stage, its exit status and seconds. A failing stage does not stop the others.
# With --sdxl the stages are install, env and
#   bench-sdxl  python -m benchmarks.gpu --model sdxl-shaped --runs 2 (SDXL base shapes, 1024x1024, 30 steps,
#               CFG 5; the first call builds the 7 GB random SDXL-shaped checkpoint under $TMPDIR, about a minute)
#                                                                                   -> bench-sdxl.json, .md, .log
# Each mode fits in 6 minutes of a lease; a fresh machine starts without the SD 1.5 run's files.
# The dry run installs nothing into the machine's Python, collects the GPU tests instead of running them and runs
# the benchmark's --dry-run (arguments, imports, the result writer); it takes seconds.
set -uo pipefail
cd "$(dirname "$0")/.."

dry=0
sdxl=0
for arg in "$@"; do
    case $arg in
    --dry-run) dry=1 ;;
    --sdxl) sdxl=1 ;;
    *)
        echo "usage: bash benchmarks/device.sh [--dry-run] [--sdxl]" >&2
        exit 2
        ;;
    esac
done
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
site=${DEVICE_SITE:-/tmp/site}
[ "$dry" = 1 ] && site=$(mktemp -d)
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
: >"$OUT/stages.txt"

stage() {  # stage NAME SECONDS COMMAND...: run COMMAND under a timeout and record how it ended
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    if [ "$(type -t "$1")" = function ]; then
        timeout --kill-after=10 "$limit" bash -c "$1"  # exported below; timeout runs programs, not functions
    else
        timeout --kill-after=10 "$limit" "$@"
    fi
    rc=$?
    echo "$name rc=$rc seconds=$(($(date +%s) - start))$([ $rc = 124 ] && echo ' (timed out)')" >>"$OUT/stages.txt"
    return 0
}

install_wheels() {  # only the wheels whose distribution is not installed here
    local missing
    missing=$(python3 - .whl <<'EOF'
import importlib.metadata as md
import pathlib
import sys

for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    dist = wheel.name.split("-")[0]
    try:
        md.version(dist)
    except md.PackageNotFoundError:
        print(wheel)
EOF
    )
    echo "wheels to install: ${missing:-none}"
    [ -z "$missing" ] && return 0
    # shellcheck disable=SC2086  # one path per line, no spaces in wheel names
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" $missing
}

environment() {
    date -u
    nvidia-smi 2>&1 || echo "nvidia-smi: not available"
    python3 - <<'EOF'
import importlib.metadata as md
import platform

print("python", platform.python_version())
for name in ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt",
             "cuda-bindings", "cupy-cuda13x", "cupy-cuda12x", "numpy", "pillow", "pytest"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "-")
try:
    from runtime.cuda import driver_version, runtime_version

    print("driver CUDA", driver_version(), "| cuda-bindings runtime CUDA", runtime_version())
except Exception as exc:  # no driver or no bindings: say which
    print("CUDA:", exc)
try:
    import torch

    print("torch CUDA", torch.version.cuda, "available", torch.cuda.is_available())
except Exception as exc:
    print("torch:", exc)
EOF
}

export -f install_wheels environment
export site

pytest_args=(-p no:cacheprovider -q -rs)
plumbing=tests/gpu/test_tensorrt_plumbing.py
if [ "$dry" = 1 ]; then
    pytest_args+=(--collect-only)
fi

{ stage install 20 install_wheels; stage env 15 environment; } >"$OUT/env.txt" 2>&1
work=${TMPDIR:-/tmp}/sdrt-bench
if [ "$sdxl" = 1 ]; then
    bench=(python3 -m benchmarks.gpu --model sdxl-shaped --steps 30 --runs 2 --size 1024 --cfg 5 --backends torch-cuda
           --out "$OUT" --stem bench-sdxl --work "$work")
    [ "$dry" = 1 ] && bench+=(--dry-run)
    stage bench-sdxl 270 "${bench[@]}" >"$OUT/bench-sdxl.log" 2>&1
    [ "$dry" = 1 ] && rm -rf "$site"
    cat "$OUT/stages.txt"
    exit 0
fi
stage gpu 100 python3 -m pytest "${pytest_args[@]}" -m gpu tests/gpu --ignore="$plumbing" \
    --junitxml="$OUT/gpu-tests.xml" >"$OUT/gpu-tests.log" 2>&1
stage plumbing 25 python3 -m pytest "${pytest_args[@]}" "$plumbing" --junitxml="$OUT/plumbing.xml" \
    >>"$OUT/gpu-tests.log" 2>&1
bench=(python3 -m benchmarks.gpu --steps 50 --runs 3 --size 512 --backends torch-cuda --out "$OUT" --stem bench
       --work "$work")
[ "$dry" = 1 ] && bench+=(--dry-run)
stage bench 150 "${bench[@]}" >"$OUT/bench.log" 2>&1

[ "$dry" = 1 ] && rm -rf "$site"
cat "$OUT/stages.txt"
