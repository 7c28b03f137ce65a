#!/usr/bin/env bash
# Set-up + the whole test suite (fast unit tier, then the slow integration tier with real Ray,
# DeepSpeed and Prometheus), as the README's second command.
#   bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
# pytest exits 5 when it collects no test: that is a failure here, never a success.
exec .venv/bin/python -m pytest "$@"
