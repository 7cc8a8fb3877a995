#!/usr/bin/env bash
# Install OpenRL into ./.venv (a no-op when it is up to date), start the local stack and run a short SFT
# demo through the unmodified tinker SDK. The stack stays up afterwards; Ctrl-C stops it.
# Extra arguments go to `openrl up` (e.g. --exit-after-demo, --port 8080, --data-dir DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/openrl up --demo "$@"
