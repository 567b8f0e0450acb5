#!/usr/bin/env bash
# Install, then generate from a few prompts on the embedded default model with AEP over MPI.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export PATH="$PWD/.venv/bin:$PATH"
in=${1:-examples/requests.jsonl}
out=${2:-out/results.jsonl}
amoe-serve generate --input "$in" --output "$out" --config configs/local.yaml
cat "$out"
