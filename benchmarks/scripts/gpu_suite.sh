#!/usr/bin/env bash
# The -m gpu suite at world size 4, then 2 (WORLDS="8 4 2" on an 8-GPU machine; "1": one rank on
# one GPU, tests/test_single_rank.py), then (SOAK=1)
# the 4-GPU soak, one after another:
# never run two multi-rank jobs on the same GPUs at once (each GPU time-slices the process
# groups, and kernels that wait for all ranks then crawl; benchmarks/NOTES.md run 8).
# One verbose log per step under $OUT, so a step cut by its time limit still shows what passed.
# Usage: [WORLDS="4 2"] [SUITE_TIMEOUT=s] [SOAK=1 SOAK_TIMEOUT=s MOE_EP_SOAK_CALLS=... MOE_EP_SOAK_HIDDEN=...] \
#        bash benchmarks/scripts/gpu_suite.sh [pytest args]
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/moe_ep_out}
mkdir -p "$OUT"
run() {  # name, time limit, pytest args...
  local name=$1 limit=$2; shift 2
  timeout -k 10 "$limit" python3 -m pytest -v -p no:cacheprovider -o console_output_style=times --durations=12 -rfEs "$@" >"$OUT/$name.log" 2>&1
  echo "$name: exit $?" >>"$OUT/$name.log"
}
for w in ${WORLDS:-4 2 1}; do
  if [ "$w" = 1 ]; then CUDA_VISIBLE_DEVICES=0 run gpu1 "${SUITE_TIMEOUT:-500}" -m gpu tests/test_single_rank.py "$@"; fi
  if [ "$w" = 4 ]; then run gpu4 "${SUITE_TIMEOUT:-500}" -m gpu -k "gpu4 or cuda-4" "$@"; fi
  if [ "$w" = 8 ]; then run gpu8 "${SUITE_TIMEOUT:-500}" -m gpu -k "gpu8 or cuda-8" "$@"; fi
  if [ "$w" = 2 ]; then CUDA_VISIBLE_DEVICES=0,1 run gpu2 "${SUITE_TIMEOUT:-500}" -m gpu -k "gpu2 or cuda-2" "$@"; fi
done
if [ "${SOAK:-0}" = 1 ]; then run soak4 "${SOAK_TIMEOUT:-600}" -m "soak and gpu" -k gpu4 -s tests/test_soak.py; fi
grep -h "PASSED\|FAILED\|ERROR\|SKIPPED\|exit\|passed\|failed\| calls in " "$OUT"/*.log
