#!/usr/bin/env bash
# bash benchmarks/gpu.sh [OUT_DIR] [gpu_bench.py options]
#
# The prepared GPU benchmark of the `paper` preset on one GPU (sized for an H100: under 5 minutes,
# measuring stops at --budget 230 s): samples/s per stage, peak memory split into weights / grads /
# Adam / activations, and MFU, for precision default (PyTorch's: cuDNN TF32) / fp32 / bf16 autocast
# x NCHW / channels_last, then the DeepSpeed engine step (when DeepSpeed is installed) and a batch
# sweep. Writes OUT_DIR/gpu-bench.json (+ gpu-bench.log, nvidia-smi.txt); OUT_DIR is the first
# argument, else $OUT, else ./bench-gpu. What it measures: benchmarks/gpu_bench.py's docstring.
#
# Needs torch with CUDA plus what sdn-dist's model code imports (torchvision, pydantic, pyyaml,
# fsspec): an installed sdn-dist (`pip install -e .`) has them. On a machine without a registry,
# put wheels in ./.whl (see docs/performance.md) and they are installed from there first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

OUT_DIR="${OUT:-bench-gpu}"
if [[ $# -gt 0 && "$1" != -* ]]; then
  OUT_DIR="$1"
  shift
fi
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1

need="import torch, torchvision, pydantic, yaml, fsspec"
if ! "$PY" -c "$need" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    echo "gpu.sh: installing the wheels in .whl/ (offline)" >&2
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/sdn-site .whl/*.whl
    export PYTHONPATH="/tmp/sdn-site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "gpu.sh: installing sdn-dist (pip install -e .)" >&2
    "$PY" -m pip install -q -e . || true
  fi
fi
"$PY" -c "$need" || { echo "gpu.sh: error: need torch, torchvision, pydantic, pyyaml, fsspec (pip install -e .)" >&2; exit 2; }
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu.sh: error: no CUDA device visible to torch')"

nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1 || true
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# timeout: a hung start (driver, NCCL) must not eat the whole device lease; JSON is written as it goes.
set -o pipefail
timeout 280 "$PY" benchmarks/gpu_bench.py --out "$OUT_DIR/gpu-bench.json" --budget 230 "$@" 2>&1 | tee "$OUT_DIR/gpu-bench.log"
# The data-parallel peers (issue 15): the same step as plain torch DDP and as the trainer's
# DeepSpeed engine, one process per visible GPU (nccl), random in-memory batches of the preset.
# One GPU still measures DDP's and the engine's per-step cost against gpu_bench.py's plain step.
timeout 150 "$PY" -m sdn_dist.apps.bench.peer --out "$OUT_DIR/ddp-peer.json" --preset paper --steps 10 2>&1 | tee "$OUT_DIR/ddp-peer.log" || echo "gpu.sh: the DDP peer did not finish (see ddp-peer.log)" >&2
