#!/usr/bin/env bash
# Create .venv (once) and install the project with its test tools, the demo's packages and
# TensorBoard (the extras [dev,app,tensorboard]: what the README's commands use). Nothing here
# needs apt or root: the browser test's Chromium is the CI's business (.ci/run), and without it
# that test skips with its reason.
# torch is pinned only when the venv has none, so a CUDA build that is already
# there is kept; set TORCH_SPEC to choose another build (e.g. "torch==2.5.1").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
.venv/bin/python -m pip install -q -e ".[dev,app,tensorboard]"
