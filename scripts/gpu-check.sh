#!/usr/bin/env bash
# One prepared check of hvdcomp on a machine with a CUDA GPU (issue 16, item 7), in under 8 minutes:
#
#   scripts/gpu-check.sh                 # results in ./gpu-check-out/ (or in $OUT when set)
#
# 1. the machine: nvidia-smi, torch / CUDA / driver versions, which Python packages are missing;
# 2. `hvdcomp bench compressors --device cuda` at 64 MiB: compress + decompress GB/s against the
#    device-to-device copy of the same buffer (JSON);
# 3. the GPU tests, `pytest -m gpu tests/test_gpu_*.py` (no Horovod needed; without pytest the
#    same tests under scripts/gpu_check.py's minimal runner);
# 4. summary.md: the figures and every failed test.
#
# Nothing is downloaded: it uses the machine's python and torch, with the repository on
# PYTHONPATH (no install). Every step runs under its own `timeout` and the script goes on past a
# failed step; it exits 0 once summary.md is written. On a machine without CUDA it says so and
# stops (exit 0). Knobs: PYTHON (the interpreter), GPU_CHECK_BUDGET (seconds for everything,
# default 420), GPU_CHECK_SIZES (benchmark sizes in MiB, default 64), GPU_CHECK_DEVICE=cpu (runs
# every step on the CPU, the GPU tests skipping: a check of this script on a machine without GPU).
set -u

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$REPO" || exit 1
LOG="$OUT/gpu-check.log"
: > "$LOG"
: > "$OUT/steps.txt"
exec > >(tee -a "$LOG") 2>&1

START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-420}
SIZES=${GPU_CHECK_SIZES:-64}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export HVDCOMP_STALL_TIMEOUT=${HVDCOMP_STALL_TIMEOUT:-120}

say() { printf '\n=== gpu-check %s (%ss): %s\n' "$(date +%H:%M:%S)" "$(( $(date +%s) - START ))" "$*"; }

left() {  # seconds of the budget still left, never below 10
    local rest=$(( BUDGET - ($(date +%s) - START) ))
    (( rest < 10 )) && rest=10
    echo "$rest"
}

# step NAME LIMIT COMMAND...: run COMMAND under `timeout` (SIGINT first, so pytest reports what
# it has, then SIGKILL 20 s later), record its exit status and time in steps.txt.
step() {
    local name=$1 limit=$2; shift 2
    local rest; rest=$(left)
    (( limit > rest )) && limit=$rest
    say "$name (limit ${limit}s)"
    local begun; begun=$(date +%s)
    timeout -s INT -k 20 "$limit" "$@"
    local status=$?
    local note=""
    (( status == 124 || status == 137 )) && note=" (TIMED OUT after ${limit}s)"
    printf '%-22s exit %3d  %4ss%s\n' "$name" "$status" "$(( $(date +%s) - begun ))" "$note" \
        >> "$OUT/steps.txt"
    return 0
}

pick_python() {
    local candidate
    for candidate in ${PYTHON:-} python3 python "$REPO/.venv/bin/python"; do
        if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch" 2>/dev/null
        then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

say "repository $REPO ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no git')), results in $OUT"
if ! PY=$(pick_python); then
    echo "gpu-check: no python here imports torch (tried \$PYTHON, python3, python, .venv);" \
         "nothing to check. Set PYTHON=/path/to/python."
    printf '# gpu-check summary\n\nskipped: no python with torch on %s\n' "$(hostname)" \
        > "$OUT/summary.md"
    exit 0
fi
echo "python: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])'))"

if [[ $DEVICE == cuda ]] &&
    ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null
then
    echo "gpu-check: skipped: no CUDA device here (torch.cuda.is_available() is False for $PY)." \
         "Run scripts/gpu-check.sh on a machine with an NVIDIA GPU; the GPU tests skip on CPU."
    printf '# gpu-check summary\n\nskipped: no CUDA device on %s (torch %s)\n' "$(hostname)" \
        "$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null)" > "$OUT/summary.md"
    exit 0
fi

step nvidia-smi 30 bash -c "set -o pipefail; nvidia-smi | tee '$OUT/nvidia-smi.txt'"
step environment 60 "$PY" scripts/gpu_check.py env "$OUT"

# The benchmark first: its figures are the step most worth having if time runs short. The
# finite check in its default mode (auto: counted on the device, never read on the host per call).
step bench-compressors 150 "$PY" scripts/gpu_check.py bench "$OUT" --device "$DEVICE" \
    --sizes "$SIZES" --warmup 3 --repeats 20

# tests/test_gpu_*.py, and the gpu-marked tests of files that hold others too (-m gpu picks them)
mapfile -t GPU_TESTS < <(ls tests/test_gpu_*.py tests/test_comm_torchdist.py tests/test_ddp_hook.py 2>/dev/null)
if "$PY" -c "import pytest" 2>/dev/null; then
    # -p no:cacheprovider: write nothing into the tree; -o addopts=: no options a plugin missing
    # here would need
    step gpu-tests 270 "$PY" -m pytest -m gpu -v -rfE --tb=short -p no:cacheprovider -o addopts= \
        --durations=15 --junitxml="$OUT/gpu-tests.xml" "${GPU_TESTS[@]}" \
        2>&1 | tee "$OUT/pytest-gpu.log"
else
    echo "gpu-check: pytest is not installed: the GPU tests run under scripts/gpu_check.py's runner"
    step gpu-tests 270 "$PY" scripts/gpu_check.py tests "$OUT" "${GPU_TESTS[@]}"
fi

step summary 30 "$PY" scripts/gpu_check.py summary "$OUT"
say "done; results in $OUT"
ls -l "$OUT"
exit 0
