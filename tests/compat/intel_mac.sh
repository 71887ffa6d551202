#!/usr/bin/env bash
# The Intel Mac package set, checked by hand (not in CI, which has one Python set).
#
# Intel Macs get torch 2.2.2 at most (its last x86_64 macOS build, made against NumPy 1), so
# pyproject.toml pins, for macOS x86_64: torch 2.2.2, NumPy < 2, transformers < 5, diffusers < 0.36.
# `uv pip compile --python-platform x86_64-apple-darwin` resolves them to the versions below. This
# script installs that set into a venv of its own and runs the engine's core tests in it.
#
# On Linux x86_64 PyPI's torch 2.2.2 is a CUDA build: about 2.5 GB of downloads (torch and the
# nvidia-* wheels) the first time; it runs on the CPU like the Mac build. On an Intel Mac the same
# commands would install the Mac build, but this has only been run on Linux.
#
# Usage: bash tests/compat/intel_mac.sh [pytest args...]
#   VENV=/path   where the venv goes (default /tmp/l2d-intelmac; reused when its torch is 2.2.2)
#   PYTHON=...   the Python that makes it (default python3; 3.10 to 3.12)
set -euo pipefail
cd "$(dirname "$0")/../.."

VENV=${VENV:-/tmp/l2d-intelmac}
PYTHON=${PYTHON:-python3}
SET=(torch==2.2.2 numpy==1.26.4 transformers==4.57.6 diffusers==0.35.2)
# The engine's own tests: models, pipeline, styles, references. Not the OBS, browser, installer or GPU ones.
TESTS=(
    tests/test_stream.py tests/test_frames.py tests/test_frames_warmup.py tests/test_reference.py
    tests/test_loading.py tests/test_sd_formats.py tests/test_styles.py tests/test_style_load.py
    tests/test_engine.py tests/test_base_models.py tests/test_depth.py tests/test_sizes.py
    tests/test_quality.py
)

have() { "$VENV/bin/python" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.2.2")' 2>/dev/null; }
if ! have; then
    echo "intel_mac: making $VENV with ${SET[*]}"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q "${SET[@]}"
    # The project's own dependencies, held to the set (pip would otherwise move to transformers 5).
    "$VENV/bin/pip" install -q -e ".[test]" "${SET[@]}"
    "$VENV/bin/pip" install -q --no-deps open-clip-torch==3.3.0  # as .ci/run: the reference tokenizer tests
fi
"$VENV/bin/python" -c '
import diffusers, numpy, torch, transformers
print(f"intel_mac: torch {torch.__version__}, numpy {numpy.__version__}, transformers {transformers.__version__}, diffusers {diffusers.__version__}")
'
"$VENV/bin/python" -m pytest -q -n 2 --dist loadfile -p no:cacheprovider -rfEs "${TESTS[@]}" "$@"
