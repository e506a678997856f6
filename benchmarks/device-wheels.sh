#!/usr/bin/env bash
# Download, on a machine that reaches PyPI, the wheels the lent GPU machine lacks into .whl/ (git-ignored), for
# `bash benchmarks/device.sh` to install there. The GPU machine has Python 3.12, torch (CUDA 13), transformers 5,
# onnx, onnxruntime (CPU build), cuda-bindings, cupy, numpy, pillow and pytest, and reaches no registry.
#
#   bash benchmarks/device-wheels.sh          # into .whl/ (re-running keeps what is already there)
#
# device.sh installs a wheel only when its distribution is missing on the machine, so listing a package that
# turns out to be present there costs bytes, nothing else. Not here: tensorrt (its PyPI wheels are stubs that
# download from a host the GPU machine cannot reach) and onnxruntime-gpu (255 MB, over what one call carries).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.whl
mkdir -p "$dest"

# pure-Python wheels: diffusers (the reference and the benchmark's peer), the export tooling, diffusers' own
# requirements that a transformers-only image may lack
pure=(
    diffusers==0.42.1
    polygraphy==0.53.6
    onnx-graphsurgeon==0.6.1
    importlib-metadata==10.2.0
    zipp==4.1.2
    requests==2.34.2
    urllib3==2.7.0
    idna==3.20
    certifi==2026.5.20
)
# binary wheels, for the GPU machine's CPython 3.12 on x86_64 Linux
binary=(
    charset-normalizer==3.4.7
)

python3 -m pip download -q --no-deps -d "$dest" "${pure[@]}"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dest" "${binary[@]}"

total=$(du -sm "$dest" | cut -f1)
echo "$(ls "$dest"/*.whl | wc -l) wheels, ${total} MiB in $dest"
if [ "$total" -gt 40 ]; then
    echo "error: $dest holds ${total} MiB, over the 40 MiB a device call can spare" >&2
    exit 1
fi
