#!/usr/bin/env bash
# Set everything up and run the test suite, then every benchmark once on tiny shapes
# (`pytest bench/ --quick`) so the suites cannot rot. This is what CI runs.
# Extra arguments go to the test run (e.g. -k projection).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
"${VENV:-.venv}/bin/python" -m pytest tests -q --durations=15 --hypothesis-seed="${HYPOTHESIS_SEED:-0}" "$@"
"${VENV:-.venv}/bin/python" -m pytest bench --quick -q -p no:cacheprovider --benchmark-disable-gc
