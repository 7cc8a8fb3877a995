#!/usr/bin/env bash
# The GPU check of issue 14 (bench/gpu_check.py says what it measures): a random-init Qwen3-8B in
# bf16, SDK -> gateway -> NATS -> trainer on CUDA, 64 x 1,024-token importance_sampling steps,
# against a bare torch + peft loop on the same batches.
#
# The GPU machine has torch, transformers and peft but not NATS, msgspec, structlog, zstandard or
# the tinker SDK, and no network. Before, on this machine, from the project root (once):
#   echo /.whl/ >> .git/info/exclude; bash ../shared/gpu/wheels.sh .whl
# then on the GPU machine (the run tool, carry [".whl"], timeout_s about 600):
#   bash bench/gpu_check.sh [gpu_check.py flags]
# It installs the carried wheels as wheels.sh's header says, runs the check, writes
# bench/results/gpu_check.json (also when a phase fails) and copies it to $OUT when that is set.
# It takes about 9 minutes on an H100 (estimate: build + save 16 GB, trainer load, 2 x 5 steps;
# issue 20's shared workload: a stack with a sampler (two 16 GB loads), 1 then 8 toy RL jobs of 6
# steps, 10 weight syncs; the tenant-batching part: an engine load, 8 tenants, 5 x (one shared
# call + 8 alone), with activation checkpointing on; LoRA slots in the sampler's forward, grouped
# against dense); --steps 2 shortens it, --parts picks parts (stack,bare,jobs,tenants,slots:
# --parts jobs,tenants,slots is issue 20's alone, about 5 minutes), --tenants 0 skips the last two. On CPU, end to end with a tiny model (a venv needs no wheels):
#   PYTHON=.venv/bin/python bash bench/gpu_check.sh --tiny
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# Only where the packages are missing (the GPU machine); a venv that has them keeps its own.
if ! "$PYTHON" -c "import nats, msgspec, structlog, zstandard, tinker" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH || exit
fi
out=bench/results/gpu_check.json
rm -f "$out"
copy_out() { if [ -n "${OUT:-}" ] && [ -f "$out" ]; then cp "$out" "$OUT"/; fi; }
trap copy_out EXIT
"$PYTHON" bench/gpu_check.py --out "$out" "$@"
