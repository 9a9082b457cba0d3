#!/usr/bin/env bash
# One-command set-up for hvdcomp: Open MPI, a virtual environment with torch, mpi4py and the
# project, and Horovod 0.28.1 built for torch 2.x (cached, so a second run takes seconds).
#
#   scripts/setup.sh            # creates .venv in the repository (override with HVDCOMP_VENV)
#
# Idempotent: every step checks what is already there first.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${HVDCOMP_VENV:-$REPO/.venv}
PYTHON=${PYTHON:-python3}
HOROVOD_VERSION=${HOROVOD_VERSION:-0.28.1}
# Here pip finds torch 2.13.0 as a local CPU wheel. On a cluster, set TORCH_SPEC to the torch the
# site provides (any torch >= 2.1), or pre-install it in the venv: an installed torch is kept.
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
CACHE=${HVDCOMP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hvdcomp}

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
die() { printf '\033[1;31m[setup] error:\033[0m %s\n' "$*" >&2; exit 1; }

# --- 1. Open MPI -------------------------------------------------------------------------------
if ! command -v mpicc >/dev/null 2>&1 || ! command -v mpirun >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "Open MPI not found: installing openmpi-bin libopenmpi-dev with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq openmpi-bin libopenmpi-dev >/dev/null
    else
        die "Open MPI is missing (no mpicc/mpirun on PATH). Install it first:
    Debian/Ubuntu:  sudo apt-get install openmpi-bin libopenmpi-dev
    on a cluster:   module load openmpi   (then re-run this script)"
    fi
fi
say "MPI: $(mpirun --version 2>&1 | head -n1)"

# --- 2. virtual environment with torch, mpi4py and the runtime dependencies --------------------
if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
pip_install() {
    # Some sites configure extra package indexes that do not exist on every machine; pip warns
    # about each of them for every package, which buries real errors.
    "$PY" -m pip install -q --disable-pip-version-check "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }
    return "${PIPESTATUS[0]}"
}
if ! "$PY" -c 'import torch' >/dev/null 2>&1; then
    say "installing $TORCH_SPEC"
    pip_install "$TORCH_SPEC"
fi
# Horovod's own build and runtime needs (installed before it, so it can build without isolation).
pip_install numpy "mpi4py>=4" "setuptools<81" wheel packaging cloudpickle psutil pyyaml cffi

# --- 3. Horovod, built against this torch, cached outside the repository -----------------------
versions=$("$PY" -c 'import sys, torch; print("py%d%d-torch%s" % (sys.version_info[0], sys.version_info[1], torch.__version__.split("+")[0].replace(".", "_")))')
gpu_flag=${HOROVOD_GPU_OPERATIONS:-cpu}
key="horovod-$HOROVOD_VERSION-$versions-$gpu_flag"
wheel_dir="$CACHE/wheels/$key"

horovod_ok() {
    "$PY" - <<'PY' >/dev/null 2>&1
import horovod, horovod.torch as hvd
assert hvd.mpi_built() and hvd.gloo_built()
PY
}

if horovod_ok && [ "$("$PY" -c 'import horovod; print(horovod.__version__)')" = "$HOROVOD_VERSION" ]; then
    say "Horovod $HOROVOD_VERSION already installed"
else
    if ! ls "$wheel_dir"/horovod-*.whl >/dev/null 2>&1; then
        build="$CACHE/build/$key"
        log="$CACHE/build/$key.log"
        rm -rf "$build"; mkdir -p "$build" "$wheel_dir"
        say "building Horovod $HOROVOD_VERSION for $versions ($gpu_flag); 4 to 12 minutes on 2 cores; log: $log"
        ( cd "$build" && "$PY" -m pip download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d . 2>&1 | { grep -v '^WARNING: Location' || true; } ) \
            || die "could not download the Horovod $HOROVOD_VERSION sdist"
        tar -xzf "$build"/horovod-"$HOROVOD_VERSION".tar.gz -C "$build"
        src="$build/horovod-$HOROVOD_VERSION"
        # Horovod 0.28.1 asks for C++14; torch >= 2.1 headers need C++17.
        sed -i 's/CMAKE_CXX_STANDARD 14/CMAKE_CXX_STANDARD 17/' "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
        grep -q 'CMAKE_CXX_STANDARD 17' "$src/horovod/torch/CMakeLists.txt" \
            || die "the C++17 patch did not apply to $src/horovod/torch/CMakeLists.txt"
        export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
        export HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1
        if [ "$gpu_flag" = NCCL ]; then
            command -v nvcc >/dev/null 2>&1 || die "HOROVOD_GPU_OPERATIONS=NCCL needs CUDA (nvcc not on PATH)"
        fi
        export MAKEFLAGS="-j$(nproc)"
        if ! "$PY" -m pip wheel --no-build-isolation --no-deps -v "$src" -w "$wheel_dir" >"$log" 2>&1; then
            grep -n -i -m 20 -E 'error|fatal' "$log" >&2 || true
            rm -rf "$wheel_dir"
            die "Horovod build failed; the first errors are above, the whole log is $log"
        fi
        rm -rf "$build"
    else
        say "using cached Horovod wheel $wheel_dir"
    fi
    pip_install --no-deps --force-reinstall "$wheel_dir"/horovod-*.whl
    horovod_ok || die "Horovod installed but does not import with MPI and Gloo: run $PY -c 'import horovod.torch'"
fi

# --- 4. the project, editable, with its test extras --------------------------------------------
pip_install -e "$REPO[test]"
say "ready: source $VENV/bin/activate && hvdcomp doctor"
