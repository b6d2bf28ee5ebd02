#!/usr/bin/env bash
# One GPU pass: GPU tests, demo, then a benchmark sweep; logs and results under $OUT.
# Usage (from the repository root): bash benchmarks/scripts/gpu_pass.sh [bench args...]
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/moe_ep_out}
mkdir -p "$OUT"
LOG="$OUT/pass.log"
{
  date; nvidia-smi --query-gpu=name,memory.total --format=csv; nvidia-smi topo -m
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "== gpu tests"; timeout ${TEST_TIMEOUT:-420} python3 -m pytest -q -m gpu -p no:cacheprovider --durations=15 ${GPU_TEST_ARGS:-} 2>&1 | tail -60
  echo "== demo"; timeout ${DEMO_TIMEOUT:-200} python3 -m moe_ep.demo 2>&1 | tail -12
} >"$LOG" 2>&1
echo "== bench" >>"$LOG"
timeout ${BENCH_TIMEOUT:-400} python3 benchmarks/bench_ep.py --out "$OUT/bench" "$@" >>"$LOG" 2>&1
tail -c 11000 "$LOG"
