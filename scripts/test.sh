#!/usr/bin/env bash
# Install (if needed) and run the test suite, offline, on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
