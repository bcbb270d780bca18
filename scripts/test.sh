#!/usr/bin/env bash
# Install (if needed) and run the test suite, offline, on the CPU.
#   bash scripts/test.sh          every test (what CI runs)
#   bash scripts/test.sh --fast   the fast tier: unit tests and one train -> export -> OpenVINO smoke test
# Other arguments go to pytest (e.g. bash scripts/test.sh --fast tests/test_components.py -x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
tier=()
if [ "${1:-}" = "--fast" ]; then
  tier=(-m "not slow")
  shift
fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider "${tier[@]}" tests "$@"
