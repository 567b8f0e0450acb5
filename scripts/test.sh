#!/usr/bin/env bash
# The test command: install into .venv, then run the whole suite (multi-rank tests use the
# venv's mpiexec; nothing needs a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=1
exec .venv/bin/python -m pytest -q -rs --timeout=600 "$@"
