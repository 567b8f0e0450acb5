#!/usr/bin/env bash
# One command on a single-GPU machine (< 8 min): calibrate the simulator's device table at the
# real Mixtral-8x7B layer size, run the GPU tests and the kernel benchmark, then the simulator's
# goodput headline on the measured table beside the spec-sheet one.
#   bash scripts/gpu-calibrate.sh            # writes configs/sim/<gpu>-calibrated.yaml, out/gpu-calibrate/
#   bash scripts/gpu-calibrate.sh --dry-run  # CPU-safe: prints the steps, runs nothing
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .venv/bin/activate ] && source .venv/bin/activate
OUT=${OUT_DIR:-out/gpu-calibrate}
DRY=0; [ "${1:-}" = "--dry-run" ] && DRY=1
step() { echo "[gpu-calibrate] $*"; if [ "$DRY" = 0 ]; then eval "$@"; fi; }

PLAN=$(python -m amoe_serve.sim.gpu_calibrate --dry-run)
SLUG=$(python -c 'import json,sys; print(json.loads(sys.argv[1])["slug"])' "$PLAN")
TABLE=configs/sim/${SLUG}-calibrated.yaml
echo "[gpu-calibrate] plan: $PLAN"
mkdir -p "$OUT"
# 1. calibration (~3 min: writes ~6 GB of random bf16 weights once, then times the ranks' code)
step "timeout 300 python -m amoe_serve.sim.gpu_calibrate --out $TABLE --blocks 2 --checkpoint $OUT/mixtral-layers"
# 2. GPU tests and kernel benchmark (~2 min)
step "timeout 150 python -m pytest -q tests/kernels/test_gpu.py tests/kernels/test_paged_attention.py 2>&1 | tee $OUT/gpu-tests.log"
step "timeout 90 python -m amoe_kernels.bench 2>&1 | tee $OUT/kernel-bench.txt"
# 3. the simulator on the measured table beside the spec-sheet one (16 GPUs, reduced sweep, ~1 min)
for dev in "$TABLE" a100; do
  name=$(basename "$dev" .yaml)
  step "timeout 60 python -m amoe_serve.cli sim --config configs/sim/goodput.yaml --output $OUT/sim-$name cluster.device=$dev 'cluster.gpus=[16]' 'run.aep_attention_fractions=[0.25,0.5]' 'run.replicas=[1]' 'run.aep_max_running=[32,128,512]' 'run.lockstep_max_running=[32,128,512]'"
done
echo "[gpu-calibrate] done: $TABLE, $OUT"
