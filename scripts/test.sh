#!/usr/bin/env bash
# Install (if needed) and run the test suite, offline, on the CPU.
#   bash scripts/test.sh          every test (what CI runs)
#   bash scripts/test.sh --fast   the fast tier: unit tests and one train -> export -> OpenVINO smoke test
# Other arguments go to pytest (e.g. bash scripts/test.sh --fast tests/test_components.py -x; -n 0 runs in one process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
tier=()
if [ "${1:-}" = "--fast" ]; then
  tier=(-m "not slow")
  shift
fi
# One pytest worker per core (pytest-xdist), each test file on one worker (its module fixtures run once), one
# thread per process: the tests are many small CPU-bound runs, so processes side by side beat threads in one. Files
# go out in collection order, which tests/conftest.py sorts slow files first.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n auto --dist loadfile --no-loadscope-reorder "${tier[@]}" tests "$@"
