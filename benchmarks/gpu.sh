#!/usr/bin/env bash
# The CUDA benchmarks in one go, for a session lent an H100/H200 (budget: under 8 minutes).
#
#   bash benchmarks/gpu.sh                 # on the GPU machine, from the repository root
#
# Writes benchmarks/results/*_cuda.{md,json}:
#   solver_update_{fp32,bf16}_cuda   the fused update kernel's bandwidth against a device-to-device
#                                    copy of the same bytes (state fp32 / bf16 outputs, several B x D)
#   realsize_net_cuda                DiT-XL/2 step time by batch, eager vs CUDA graphs, fp32 (TF32) vs
#                                    bf16, utilisation against the datasheet peak; SD VAE decode; encode
#   realsize_service_cuda(_service)  the executor's ceiling and the service at concurrency 64 (mixed
#                                    1/2/4/8 steps, embedded and Redis when redis-server is there)
#
# STRIDE_GPU_SMOKE=1 runs the same steps at tiny sizes on the CPU with no installs, into
# $STRIDE_GPU_OUT (the test suite does this so that the script cannot rot).
set -euo pipefail
cd "$(dirname "$0")/.."

SMOKE=${STRIDE_GPU_SMOKE:-0}
OUT=${STRIDE_GPU_OUT:-benchmarks/results}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
start=$(date +%s)
step() { echo "== $(( $(date +%s) - start )) s: $*"; }

if [ "$SMOKE" = 1 ]; then
    DEV=(--device cpu) SIZE=(--tiny --min-seconds 0.02) UPD=(--device cpu --quick)
    SERVICE=(--concurrency 2 --duration 1 --warmup 0.3 --ceiling-seconds 0.3 --ceiling-occupancy 2 --max-batch 4)
    NET=(--batches 1,2)
else
    step "installing what is missing"
    if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
        "$PY" -m pip install -q "torch==2.13.0"
    fi
    "$PY" -m pip install -q -e ".[serve,offline,dev]" "torch==2.13.0"
    if ! command -v redis-server >/dev/null; then
        (apt-get install -y -q redis-server >/dev/null 2>&1 || sudo apt-get install -y -q redis-server >/dev/null 2>&1) \
            || echo "redis-server unavailable: the service runs in embedded mode only"
    fi
    "$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"
    DEV=(--device cuda) SIZE=(--dits XL/2 --min-seconds 0.3) UPD=(--device cuda)
    SERVICE=(--concurrency 64 --duration 15 --warmup 4 --ceiling-seconds 4 --ceiling-occupancy 64)
    NET=(--batches-cuda 1,8,32,64,128 --decode-batches 1,8)
fi
MODES=embedded
if [ "$SMOKE" != 1 ] && command -v redis-server >/dev/null; then MODES=embedded,redis; fi

step "update kernel vs copy: fp32 state, fp32 outputs"
"$PY" benchmarks/solver_update.py "${UPD[@]}" --dtype float32 --ddtype float32 --out "$OUT/solver_update_fp32_cuda.md"
step "update kernel vs copy: fp32 state, bf16 outputs"
"$PY" benchmarks/solver_update.py "${UPD[@]}" --dtype float32 --ddtype bfloat16 --out "$OUT/solver_update_bf16_cuda.md"

step "DiT-XL/2 step time (eager vs graphs, fp32 vs bf16), SD VAE decode, encode"
"$PY" benchmarks/realsize.py "${DEV[@]}" "${SIZE[@]}" "${NET[@]}" --parts network,decode,encode \
    --out "$OUT/realsize_net_cuda.md"

step "executor ceiling and the service at concurrency 64"
"$PY" benchmarks/realsize.py "${DEV[@]}" "${SIZE[@]}" "${SERVICE[@]}" --parts ceiling,service --modes "${MODES}" \
    --out "$OUT/realsize_service_cuda.md"

step "done; results in $OUT"
ls "$OUT"/*_cuda*
