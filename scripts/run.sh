#!/usr/bin/env bash
# Set everything up and run the library's main job: fine-tune on the built-in synthetic shapes
# with the small CPU recipe and print the test accuracy. Extra arguments go to
# `any2point-fast train` (e.g. --set train.epochs=5, --output runs/mine).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
exec "${VENV:-.venv}/bin/python" -m any2point_fast train "$@"
