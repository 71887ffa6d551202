#!/usr/bin/env bash
# Fetches, here (where PyPI is reachable), the wheels that tests/gpu_check.sh needs and the lent GPU
# machine lacks, into .gpu_wheels/ (ignored by git). Carry that folder with the device command
# (carry: [".gpu_wheels"]); the check installs them there with no network.
#
# The GPU machine has Python 3.12 with torch 2.11.0+cu130, transformers 5.17, huggingface_hub 1.33,
# safetensors 0.8, numpy, opencv-python-headless, pyyaml, peft, tqdm, psutil, regex, requests,
# pillow (/work/.library/device/KINDS.md). Of what check-reference, check-accelerate and bench-gpu
# import, it lacks diffusers alone: those three commands ran on the CPU in a virtual environment
# holding only the machine's packages, from the source tree, once this wheel was installed with
# --no-deps into a --target folder on PYTHONPATH (diffusers' own needs, huggingface_hub>=1.32,
# safetensors>=0.8, regex, requests, Pillow, filelock, numpy, are on the machine; importlib_metadata
# is imported only on Python < 3.8). The version is the one our venv runs (tests/test_gpu_check.py
# checks that it matches). diffusers is pure Python: one wheel for every platform.
#
# Usage: bash tests/gpu_wheels.sh   (PY=python to use: default python3; GPU_CHECK_WHEELS=folder)
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${GPU_CHECK_WHEELS:-.gpu_wheels}"
py="${PY:-python3}"
WHEELS=(diffusers==0.42.1)

mkdir -p "$dest"
rm -f "$dest"/*.whl  # one version of each: two of one package stop the install there
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dest" "${WHEELS[@]}"
bytes=$(cat "$dest"/*.whl | wc -c)
ls -l "$dest"
echo "gpu wheels: $(find "$dest" -name '*.whl' | wc -l) in $dest, $(( bytes / 1024 )) KiB (the carried tree's limit is 64 MiB)"
if (( bytes > 32 * 1024 * 1024 )); then
    echo "gpu wheels: over 32 MiB; the working tree travels with at most 64 MiB" >&2
    exit 1
fi
