#!/usr/bin/env bash
# Set everything up and run the library's main job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
exec .venv/bin/python -m any2point_fast.demo "$@"
