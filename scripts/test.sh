#!/usr/bin/env bash
# The test command: install into .venv, then run the whole suite (multi-rank tests use the
# venv's mpiexec; nothing needs a GPU).
#   bash scripts/test.sh              the default run (what CI runs): everything but `extended`
#                                     tests (their coverage repeats a faster test's; see pyproject.toml)
#   bash scripts/test.sh --all        everything, `extended` tests included
#   bash scripts/test.sh --fast       the inner loop: no MPI jobs, Slurm, Ray, slow or extended tests,
#                                     and no reinstall when .venv exists (a few minutes)
# Further arguments go to pytest, e.g. `bash scripts/test.sh --fast tests/sched -x`; a `-m EXPR`
# among them replaces the mode's marker selection (`bash scripts/test.sh -m extended` runs only those).
set -euo pipefail
cd "$(dirname "$0")/.."
MARKS=(-m "not extended")
if [ "${1:-}" = "--fast" ]; then
  shift
  MARKS=(-m "not mpi and not slurm and not slow and not ray and not extended")
  [ -x .venv/bin/python ] || bash scripts/install.sh
elif [ "${1:-}" = "--all" ]; then
  shift
  MARKS=()
  bash scripts/install.sh
else
  bash scripts/install.sh
fi
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=1
exec .venv/bin/python -m pytest -q -rs --timeout=600 ${MARKS[@]+"${MARKS[@]}"} "$@"
