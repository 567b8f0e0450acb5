#!/usr/bin/env bash
# The test command: install into .venv, then run the whole suite (multi-rank tests use the
# venv's mpiexec; nothing needs a GPU).
#   bash scripts/test.sh              everything (what CI runs)
#   bash scripts/test.sh --fast       the inner loop: no MPI jobs, Slurm, Ray or slow tests, and no
#                                     reinstall when .venv exists (a few minutes)
# Further arguments go to pytest, e.g. `bash scripts/test.sh --fast tests/sched -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
MARKS=()
if [ "${1:-}" = "--fast" ]; then
  shift
  MARKS=(-m "not mpi and not slurm and not slow and not ray")
  [ -x .venv/bin/python ] || bash scripts/install.sh
else
  bash scripts/install.sh
fi
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=1
exec .venv/bin/python -m pytest -q -rs --timeout=600 ${MARKS[@]+"${MARKS[@]}"} "$@"
