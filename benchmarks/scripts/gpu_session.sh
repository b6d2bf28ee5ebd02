#!/usr/bin/env bash
# One step of a GPU session, sized for one 10-minute device call; everything it writes is packed
# into $OUT/<step>.tar.gz (the device tool brings back at most 8 files) beside $OUT/<step>.log.
#   suite  the -m gpu suite at world size 4, then 2 (benchmarks/scripts/gpu_suite.sh)
#   soak   MOE_EP_SOAK_CALLS (10000) checked dispatch + combine pairs on 4 GPUs, fp8, alone
#   bench  the EP4 and EP2 sweep with the nccl-padded, nccl-naive, NVSHMEM (all_to_all_vdev_2d) and p2p
#          baselines, and DeepEP where it loads: with a carried .whl/classic (or $DEEPEP_WHEELS) the
#          sgl-deep-ep wheel is installed into /tmp/deepep-site first (benchmarks/NOTES.md, issue 22)
#   tune   python -m moe_ep.tune on 4 and 2 GPUs, LL, HT and inter (2 x 2) (the tuned JSON lands in the tarball)
# Usage: MOE_EP_COMMIT=<sha> bash benchmarks/scripts/gpu_session.sh STEP [extra args for the step]
set -u
STEP=${1:?step: suite, soak, bench or tune}; shift
export PYTHONPATH=. PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/moe_ep_out}
WORK=$OUT/$STEP
mkdir -p "$WORK"
LOG=$OUT/$STEP.log
{ date; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; echo "commit ${MOE_EP_COMMIT:-?}"; } >"$LOG"
case $STEP in
  suite) OUT=$WORK SUITE_TIMEOUT=${SUITE_TIMEOUT:-280} bash benchmarks/scripts/gpu_suite.sh --timeout 150 "$@" >>"$LOG" 2>&1 ;;
  soak)  MOE_EP_SOAK_CALLS=${MOE_EP_SOAK_CALLS:-10000} MOE_EP_SOAK_SECONDS=${MOE_EP_SOAK_SECONDS:-520} \
         MOE_EP_SOAK_HIDDEN=${MOE_EP_SOAK_HIDDEN:-1024} timeout -k 10 570 python3 -m pytest -v -s -p no:cacheprovider \
         -m "soak and gpu" -k "gpu4 and fp8" tests/test_soak.py "$@" >>"$LOG" 2>&1 ;;
  bench) DEEPEP_WHEELS=${DEEPEP_WHEELS:-.whl/classic}
         if ls "$DEEPEP_WHEELS"/*.whl >/dev/null 2>&1; then
           python3 -m pip install -q --no-index --no-deps --target /tmp/deepep-site "$DEEPEP_WHEELS"/*.whl >>"$LOG" 2>&1
           export MOE_EP_DEEPEP_SITE=/tmp/deepep-site
         fi
         timeout -k 10 ${BENCH_TIMEOUT:-560} python3 benchmarks/bench_ep.py --out "$WORK" --worlds 4,2 --nvshmem on --prequantized \
         --iters 10 "$@" >>"$LOG" 2>&1 ;;
  tune)  timeout -k 10 ${TUNE_TIMEOUT:-560} python3 -m moe_ep.tune --worlds 4,2 --tokens 1,32,128,512,4096 \
         --paths ll,ht,inter,inter_ht --gpus-per-node 2 --out "$WORK/tuned.json" "$@" >>"$LOG" 2>&1 ;;
  *) echo "unknown step $STEP" >&2; exit 2 ;;
esac
echo "$STEP: exit $?" >>"$LOG"
tar -czf "$OUT/$STEP.tar.gz" -C "$OUT" "$STEP" && rm -rf "$WORK"
tail -c 8000 "$LOG"
