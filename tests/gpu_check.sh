#!/usr/bin/env bash
# The prepared GPU check: one command for the lent GPU machine as it is (its python3 holds torch
# 2.11+cu130 and no diffusers; no network), from the repository root, in at most 8 minutes.
#
# Here, once (PyPI): bash tests/gpu_wheels.sh    (diffusers 0.42.1 into .gpu_wheels/, 6 MiB, ignored)
# The device command (run tool: command below, carry [".gpu_wheels"], timeout_s 600):
#
#   bash tests/gpu_check.sh
#
# The engine is not pip-installed there: installing it would make pip resolve its dependencies
# (torch>=2.1,<3, opencv-python, pyvirtualcam, aiortc, ...) with no index to resolve them from, and
# could replace the machine's CUDA torch. It runs from this tree (on PYTHONPATH, `python3 -m
# live2diff_engine`) against the machine's own torch 2.11, which pyproject's range (torch>=2.1,<3)
# admits; the carried wheels go in with --no-index --no-deps into a --target folder on PYTHONPATH.
#
# Steps, each with a share of the time in seconds (its `timeout -k 5` included). Every step ends by
# the running sum of the shares (a step that ends early leaves its time to the later ones), so the
# whole ends within their sum, 470 s, plus the script's own few seconds:
#   install              30  the carried wheels, offline, into $work/site
#   preflight            30  nvidia-smi; import torch, diffusers and the engine; torch.cuda.is_available();
#                            on a failure it stops here with one line (exit 2)
#   reference-eager      35  the golden fixtures (2, 4 and 3 steps), float32, eager, fixture tolerance
#   reference-cudagraph 100  the same compiled and graph-captured (each checked against eager at its
#                            first call; cold compiles of the tiny model, one per step count)
#   reference-fp16       40  the 2-step fixture in float16, graph-captured, at rtol/atol 2e-2
#   bench-gpu           120  warmup memory (512x512, 768x432, 1024x576; float16, float32; fits 8/12/24
#                            GB?), then off, cudagraph, compile at 512x512, 2 steps, float16
#                            (--budget-s: its limit less 20 s; graphs before plain compile)
#   check-accelerate    115  compiled and graph-captured against eager at 512x512, step counts 3, 4,
#                            1, 2, float16 and float32 (--budget-s: its limit less 25 s)
# No GPU pytest: the tiny model's CUDA-graph stream against eager is reference-cudagraph's work.
# The compile caches (inductor's, triton's) and the full logs live in $work (/tmp/live2diff_gpu_check),
# shared by the steps, outside $OUT: only 8 files, 2 folders deep, come back from $OUT.
#
# Outputs in ${OUT:-gpu_out}/, 4 files (5 while a step runs): summary.txt (each step's status line
# and verdict lines, then the closing line), steps.log (the last 80 lines of each step's output),
# bench-gpu.json, check-accelerate.json, and current.log, the running step's output (moved to
# $work/logs when it ends). Exit status: 0 when every step passed (a rehearsal: every step that can
# run there), 1 when one failed or was cut off (its own status kept: 124, or 137 when the kill was
# needed), 2 when the preflight stopped it.
#
# Rehearsal without a GPU (tests/test_gpu_check.py does this with GPU_CHECK_QUICK=1):
#   PY=.venv/bin/python GPU_CHECK_DEVICE=cpu PATH=<folder with a fake nvidia-smi>:$PATH bash tests/gpu_check.sh
# passes --device cpu to every command, the tiny geometry to check-accelerate and bench-gpu, skips
# the CUDA-graph steps ("skipped (not on a GPU)", neither passed nor failed) and runs compile
# where a GPU run has cudagraph. Other knobs: GPU_CHECK_QUICK=1 (fewer fixtures, steps and frames),
# GPU_CHECK_SCALE=N (every share N times longer: a CPU compiles for minutes), GPU_CHECK_SECONDS
# (a cap on the whole, default the sum of the shares), GPU_CHECK_STEPS=a,b (only these steps; the
# install and the preflight always run), GPU_CHECK_WHEELS (default .gpu_wheels), GPU_CHECK_WORK,
# PY (default python3).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
out="${OUT:-gpu_out}"
work="${GPU_CHECK_WORK:-/tmp/live2diff_gpu_check}"
py="${PY:-python3}"
device="${GPU_CHECK_DEVICE:-cuda}"
quick="${GPU_CHECK_QUICK:-0}"
scale="${GPU_CHECK_SCALE:-1}"
wheels="${GPU_CHECK_WHEELS:-.gpu_wheels}"
only="${GPU_CHECK_STEPS:-}"
kill_after=5
mkdir -p "$out" "$work/logs" || exit 2
rm -f "$out/summary.txt" "$out/steps.log" "$out/current.log" "$out/bench-gpu.json" "$out/check-accelerate.json"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 LIVE2DIFF_HOME="$work/home"
export TRITON_CACHE_DIR="$work/triton"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

t0=$(date +%s)
planned=0                        # the running sum of the shares so far (scaled)
cap="${GPU_CHECK_SECONDS:-}"     # empty: the sum of the shares
failed=()                        # steps that failed or were cut off
not_here=()                      # steps skipped off the GPU
on_gpu=$([[ $device == cuda* ]] && echo 1 || echo 0)

say() { echo "$*" | tee -a "$out/summary.txt"; }
selected() { [[ -z $only || ,$only, == *,$1,* ]]; }

# step NAME SHARE MARGIN PATTERN COMMAND...: runs COMMAND under `timeout -k 5`, ending by the running
# sum of the shares; an argument __BUDGET__ becomes the step's limit less MARGIN seconds (the
# command's own budget). Output in $out/current.log while it runs, then its tail in steps.log,
# the lines matching PATTERN in summary.txt, the whole in $work/logs/NAME.log. Returns its status.
step() {
    local name=$1 share=$2 margin=$3 pattern=$4
    shift 4
    planned=$(( planned + share * scale ))
    local mark=$(( t0 + planned ))
    [[ -n $cap ]] && (( mark > t0 + cap )) && mark=$(( t0 + cap ))
    selected "$name" || [[ $name == install || $name == preflight ]] || return 0
    local now; now=$(date +%s)
    local limit=$(( mark - now - kill_after ))
    if (( limit < 3 )); then
        say "$name: skipped (the time is spent)"
        failed+=("$name")
        return 1
    fi
    local args=() a
    for a in "$@"; do
        [[ $a == __BUDGET__ ]] && a=$(( limit - margin > 1 ? limit - margin : 1 ))
        args+=("$a")
    done
    printf '== %s (limit %s s): %.300s\n' "$name" "$limit" "$(head -n 1 <<< "${args[*]}")" > "$out/current.log"
    timeout -k "$kill_after" "$limit" "${args[@]}" >> "$out/current.log" 2>&1
    local rc=$?  # the command's own status: nothing is piped
    local took=$(( $(date +%s) - now )) verdict
    case $rc in
        0) verdict=passed ;;
        124) verdict="CUT OFF" ;;  # timeout's TERM at the limit
        137) (( took >= limit )) && verdict="CUT OFF" || verdict="FAILED (killed)" ;;  # the KILL 5 s later, or another's (memory)
        *) verdict=FAILED ;;
    esac
    (( rc == 0 )) || failed+=("$name")
    say "$name: $verdict (exit $rc) in $took s (limit $limit s)"
    # the verdict lines (not the header, nor the commands' time-stamped progress lines)
    tail -n +2 "$out/current.log" | grep -v '^\[' | grep -E -- "$pattern" | tail -n 60 | sed 's/^/    /' | tee -a "$out/summary.txt"
    { echo "== $name: exit $rc in $took s (limit $limit s); the last 80 lines"; tail -n 80 "$out/current.log"; } >> "$out/steps.log"
    mv "$out/current.log" "$work/logs/$name.log"
    return $rc
}

# not_on_gpu NAME SHARE WHY: a CUDA-graph step off the GPU; its share goes on to the later steps.
not_on_gpu() {
    planned=$(( planned + $2 * scale ))
    selected "$1" || return 0
    say "$1: skipped (not on a GPU: $3)"
    not_here+=("$1")
}

say "gpu check: device $device$([[ $quick == 1 ]] && echo ', quick')$( ((on_gpu)) || echo ', a rehearsal'); started $(date -u '+%Y-%m-%d %H:%M:%S') UTC"

# -- install: the carried wheels, no network, no dependency resolution ------------------------------
if compgen -G "$wheels/*.whl" > /dev/null; then
    step install 30 0 "error|ERROR" \
        "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$work/site" "$wheels"/*.whl
    export PYTHONPATH="$PYTHONPATH:$work/site"  # after this tree, before nothing the machine has
else
    planned=$(( planned + 30 * scale ))
    say "install: nothing carried ($wheels/ holds no wheels): $py as it is"
fi

# -- preflight: stop here, with one line, when the check cannot run at all --------------------------
smi=$(timeout -k 2 8 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1)
smi_rc=$?
say "nvidia-smi: $( ((smi_rc == 0)) && echo "$smi" | head -n 4 | paste -sd ';' || echo "exit $smi_rc: $(echo "$smi" | head -n 1)")"
preflight='
import sys
want = sys.argv[1]
try:
    import torch
    import diffusers
except Exception as exc:
    sys.exit(f"gpu check: cannot start: {type(exc).__name__}: {exc} ({sys.executable}); fetch the wheels here with "
             "bash tests/gpu_wheels.sh and carry .gpu_wheels")
if want.startswith("cuda") and not torch.cuda.is_available():
    sys.exit(f"gpu check: cannot start: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device")
try:
    import live2diff_engine.bench.gpu, live2diff_engine.bench.accelerate, live2diff_engine.cli, live2diff_engine.reference
    import live2diff_engine.models.full_random
except Exception as exc:
    sys.exit(f"gpu check: cannot start: the engine does not import: {type(exc).__name__}: {exc}")
where = torch.cuda.get_device_name(torch.device(want)) if want.startswith("cuda") else want
print(f"python {sys.version.split()[0]} ({sys.executable}); torch {torch.__version__} (CUDA {torch.version.cuda}); "
      f"diffusers {diffusers.__version__}; device {where}")
'
if ! step preflight 30 0 "^python " "$py" -c "$preflight" "$device"; then
    line=$(grep -h "cannot start" "$work/logs/preflight.log" | tail -n 1)
    say "${line:-gpu check: cannot start: the preflight failed or was cut off (see $out/steps.log)}"
    exit 2
fi

# -- the steps --------------------------------------------------------------------------------------
fixtures="tests/golden/live2diff_tiny_a tests/golden/live2diff_tiny_c tests/golden/live2diff_tiny_d"
[[ $quick == 1 ]] && fixtures="tests/golden/live2diff_tiny_a"
ref="^== |frames match|mismatch|MISMATCH|warning|rror"
# shellcheck disable=SC2086  # $fixtures: one argument per fixture
step reference-eager 35 0 "$ref" "$py" -m live2diff_engine check-reference $fixtures --device "$device" --accelerate off
if ((on_gpu)); then
    # shellcheck disable=SC2086
    step reference-cudagraph 100 0 "$ref" "$py" -m live2diff_engine check-reference $fixtures --device "$device" --accelerate cudagraph
    step reference-fp16 40 0 "$ref" "$py" -m live2diff_engine check-reference tests/golden/live2diff_tiny_a --device "$device" \
        --dtype float16 --rtol 2e-2 --atol 2e-2 --accelerate cudagraph
else
    not_on_gpu reference-cudagraph 100 "CUDA graphs"
    not_on_gpu reference-fp16 40 "CUDA graphs"
fi

bench=(--json "$out/bench-gpu.json" --budget-s __BUDGET__)
check=(--json "$out/check-accelerate.json" --budget-s __BUDGET__)
if ((on_gpu)); then
    bench+=(--device "$device" --modes "off,cudagraph,compile" --memory-sizes "512x512,768x432,1024x576" --memory-dtypes "float16,float32")
    check+=(--device "$device")
else  # the tiny model: the full-size one takes seconds a frame on a CPU; compile where a GPU has cudagraph
    bench+=(--device "$device" --geometry tiny --modes "off,compile" --frames 3 --memory-sizes "64x64,96x64")
    check+=(--device "$device" --geometry tiny --modes compile --dtypes float32)
    not_here+=("bench-gpu cudagraph" "check-accelerate cudagraph")
    say "bench-gpu, check-accelerate: cudagraph not measured (not on a GPU); compile in its place"
fi
if [[ $quick == 1 ]]; then
    bench+=(--frames 2 --vae taesd --modes off)
    check+=(--steps 2 --calls 3)
fi
step bench-gpu 120 20 "^(bench-gpu|model|warmup|stream|frame|  |skipped|failed|interrupted|total)|rror" \
    "$py" -m live2diff_engine bench-gpu "${bench[@]}"
step check-accelerate 115 25 "rel err|accelerated streams|skipped|rror|FELL BACK|MISMATCH" \
    "$py" -m live2diff_engine check-accelerate "${check[@]}"

# -- the verdict ------------------------------------------------------------------------------------
total=$(( $(date +%s) - t0 ))
if (( ${#failed[@]} )); then
    say "gpu check: ${#failed[@]} step(s) failed or were cut off (${failed[*]}), in $total s; see $out/summary.txt and $out/steps.log"
    exit 1
fi
if (( ${#not_here[@]} )); then
    say "gpu check (rehearsal on $device): every step that runs here passed, in $total s; not run here: ${not_here[*]}"
else
    say "gpu check: every step passed, in $total s"
fi
exit 0
