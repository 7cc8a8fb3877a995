#!/usr/bin/env bash
# Install OpenRL and its test tools into ./.venv from nothing.
# torch 2.13.0 goes first: it resolves to a local CPU build here, and installing it
# before the project keeps pip from pulling a multi-GB CUDA build for the `torch` range.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
