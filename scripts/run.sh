#!/usr/bin/env bash
# Install, then serve the OpenAI API on the embedded default model: an MPI data plane (AEP,
# 1 attention + 2 expert ranks) behind a Ray Serve ingress at http://127.0.0.1:8000/v1.
# Ctrl-C stops everything. Extra arguments go to `amoe-serve up` (e.g. --port 9000).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/amoe-serve up --config configs/local.yaml "$@"
