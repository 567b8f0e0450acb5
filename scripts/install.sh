#!/usr/bin/env bash
# Creates .venv with the CPU build of torch first (any other spec pulls a multi-GB CUDA build),
# then the project with its test extras; MPI (mpi4py + the mpich wheel) comes from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
