#!/usr/bin/env bash
# The main job on a default that needs no download: 2 ranks, scikit-learn's digits.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${HVDCOMP_VENV:-$REPO/.venv}/bin
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
exec mpirun -np 2 --oversubscribe --bind-to none "$BIN/hvdcomp" train \
    --model mlp --dataset digits --algorithm liec --compressor sign --out runs/demo --overwrite "$@"
