#!/usr/bin/env bash
# Set-up + the whole test suite (the fast unit tier and the slow integration tier with real Ray,
# DeepSpeed and Prometheus), as the README's second command.
#   bash scripts/test.sh              # everything, as CI
#   bash scripts/test.sh [pytest args] # set-up, then pytest with those arguments only
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
# pytest exits 5 when it collects no test: that is a failure here, never a success.
if [ $# -gt 0 ]; then
    exec .venv/bin/python -m pytest "$@"
fi
# No arguments: the whole suite on two pytest-xdist workers (most of a test's wall time is
# processes starting and waiting: Ray, DeepSpeed, Prometheus). Each test file goes whole to one
# worker, the longest first (tests/conftest.py). SDN_TEST_WORKERS=N sets the workers (0: none).
exec .venv/bin/python -m pytest -n "${SDN_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder
