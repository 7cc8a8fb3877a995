#!/usr/bin/env bash
# Install OpenRL and its test tools into ./.venv from nothing, at the exact versions of
# requirements.lock (regenerate it with scripts/lock.sh; upgrading is a change of its own).
# torch 2.13.0 goes first: it resolves to a local CPU build here, and installing it
# before the project keeps pip from pulling a multi-GB CUDA build for the `torch` range.
# Extras to install go in $OPENRL_EXTRAS (default "dev"; CI adds "cookbook").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
lock=requirements.lock
python -m pip install -q -c "$lock" pip
python -m pip install -q -c "$lock" "torch==2.13.0"
python -m pip install -q -c "$lock" -e ".[${OPENRL_EXTRAS:-dev}]"
