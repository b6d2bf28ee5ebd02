#!/usr/bin/env bash
# The CPU contract subset (LL, HT, inter-node, the HT combine's token ranges, the expert
# layout with hooks, peer copies, barrier, rounding; 2 ranks) under each Triton release moe_ep supports, each in its own venv
# with the requirements pyproject declares for CPU ranks (dependencies + the `cpu` extra).
#
#   make test-triton-versions                       # 3.6.0 3.8.0 3.9.0
#   TRITON_VERSIONS="3.9.0" scripts/test_triton_versions.sh
#
# Venvs are kept under $VENV_ROOT (default /tmp/moe_ep-triton-venvs) and reused; each version
# prints its set-up and test times. VENV_SYSTEM_SITE=1 builds each venv on top of the running
# Python's packages (its torch, numpy, pytest), so only Triton is installed: what CI does for 3.9
# (`make test-triton-latest`).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TRITON_VERSIONS=${TRITON_VERSIONS:-"3.6.0 3.8.0 3.9.0"}
VENV_ROOT=${VENV_ROOT:-/tmp/moe_ep-triton-venvs}
TORCH_CPU=${TORCH_CPU:-torch==2.13.0+cpu}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
SUBSET="cpu2 and (ll-fp8-uniform or ht-fp8-uniform or ht_combine_token_ranges"
SUBSET+=" or internode_matches_reference and ht-fp8-prequantized or expert_layout_matches_reference and masked-ids-hooks"
SUBSET+=" and bf16 or peer_copy or barrier or rounding)"
mapfile -t requirements < <("$PYTHON" scripts/requirements.py --dependencies cpu)

summary=()
for version in $TRITON_VERSIONS; do
    venv="$VENV_ROOT/triton-$version"
    start=$(date +%s)
    if [ "${VENV_SYSTEM_SITE:-0}" = 1 ]; then
        [ -x "$venv/bin/python" ] || "$PYTHON" -m venv --system-site-packages "$venv"
    else
        [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
    fi
    "$venv/bin/python" -c "import torch" 2>/dev/null || "$venv/bin/pip" install -q "$TORCH_CPU" \
        || "$venv/bin/pip" install -q "$TORCH_CPU" --index-url "$TORCH_CPU_INDEX"
    "$venv/bin/pip" install -q "triton==$version" "${requirements[@]}" pytest pytest-timeout
    set_up=$(( $(date +%s) - start ))
    found=$("$venv/bin/python" -c 'import triton; print(triton.__version__)')
    [ "$found" = "$version" ] || { echo "the venv for Triton $version imports Triton $found"; exit 1; }
    echo "== triton $version ($("$venv/bin/python" -c 'import numpy, torch; print(f"numpy {numpy.__version__}, torch {torch.__version__}")'))"
    start=$(date +%s)
    PYTHONPATH="$PWD" TRITON_INTERPRET= "$venv/bin/python" -m pytest -q -p no:cacheprovider \
        tests/test_ep.py tests/test_expert.py tests/test_transport.py tests/test_numerics.py -k "$SUBSET"
    summary+=("triton $version: set-up ${set_up} s, tests $(( $(date +%s) - start )) s")
done
printf '%s\n' "${summary[@]}"
