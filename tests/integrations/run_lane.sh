#!/usr/bin/env bash
# One lane of `make test-integrations`: a venv with one framework (made once, then reused while it
# holds that version), moe_ep installed into it in editable mode without dependencies (so the
# framework's plugin loader finds moe_ep's entry points), then the lane's tests on CPU ranks.
# Usage: run_lane.sh VENV PACKAGE==VERSION TEST_FILE [pytest arguments]
set -euo pipefail
venv=$1 package=$2 tests=$3
shift 3
has() { "$venv/bin/python" - "$1" 2>/dev/null <<'PY'
import importlib.metadata as metadata, sys
name, _, version = sys.argv[1].partition("==")
sys.exit(metadata.version(name) != version if version else 0)
PY
}
if ! has "$package"; then
    echo "building $venv with $package (about 10 GB, minutes)"
    python3 -m venv "$venv"
    PIP_NO_CACHE_DIR=1 "$venv/bin/pip" install -q "$package"
fi
has pytest-timeout || "$venv/bin/pip" install -q pytest pytest-timeout
"$venv/bin/pip" install -q --no-deps --no-build-isolation -e .
start=$(date +%s)
status=0
PYTHONPATH="$PWD" "$venv/bin/python" -m pytest -q -m integrations "$tests" "$@" || status=$?
echo "$package lane: $(($(date +%s) - start)) s (venv $venv)"
exit $status
