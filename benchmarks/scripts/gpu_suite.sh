#!/usr/bin/env bash
# The -m gpu suite at world sizes 2 and 4 side by side (two pytest processes: the 2-rank one on
# GPUs 0,1), and optionally the 4-GPU soak beside them; one log each under $OUT.
# Usage: [SUITE_TIMEOUT=s] [SOAK=1 MOE_EP_SOAK_CALLS=... MOE_EP_SOAK_HIDDEN=...] bash benchmarks/scripts/gpu_suite.sh [pytest args]
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/moe_ep_out}
T=${SUITE_TIMEOUT:-500}
mkdir -p "$OUT"
run() {  # name, pytest args...
  local name=$1; shift
  timeout -k 10 "$T" python3 -m pytest -q -p no:cacheprovider --durations=12 -rfEs "$@" >"$OUT/$name.log" 2>&1
  echo "$name: exit $?" >>"$OUT/$name.log"
}
CUDA_VISIBLE_DEVICES=0,1 run gpu2 -m gpu -k "gpu2 or cuda-2" "$@" &
run gpu4 -m gpu -k "gpu4 or cuda-4" "$@" &
if [ "${SOAK:-0}" = 1 ]; then run soak4 -m "soak and gpu" -k gpu4 -s tests/test_soak.py & fi
wait
for f in "$OUT"/*.log; do echo "=== $f"; tail -n 25 "$f"; done
