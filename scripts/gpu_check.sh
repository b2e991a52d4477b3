#!/usr/bin/env bash
# The prepared GPU check of issue 19 (see scripts/gpu_check.py): on the GPU machine, from the
# repository root, with only that machine's own packages (the checkout is put on PYTHONPATH):
#   bash scripts/gpu_check.sh "$OUT/gpu.json"
# then here: .venv/bin/python scripts/bench_report.py --gpu gpu.json
# --dry-run runs every step on the CPU on tiny shapes (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" scripts/gpu_check.py "$@"
