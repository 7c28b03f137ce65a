#!/usr/bin/env bash
# Run: launchers/local.sh [--preset P] [--config FILE.yaml] [--set key=value ...]
#
# No cluster: plain `sdn-dist train` on an embedded local Ray in this process tree (RAY_ADDRESS
# is cleared so an exported cluster address cannot redirect it). Arguments pass through to
# `sdn-dist train`; without --preset/--config the demo preset runs. Examples:
#   launchers/local.sh                                   # demo preset, runs/demo
#   launchers/local.sh --preset debug --set out=runs/dbg --set metrics.port=9400
# Env: SDN_RUN_ID / SDN_ATTEMPT are passed on if set (the trainer labels metrics and its run
# state with them); unset, the run id is the run directory's name and the attempt the start time.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
unset RAY_ADDRESS

args=("$@")
has_preset=0
for a in "${args[@]}"; do
  case "$a" in --preset|--preset=*|--config|--config=*) has_preset=1 ;; esac
done
if [[ "$has_preset" == 0 ]]; then
  args=(--preset "${SDN_PRESET:-demo}" "${args[@]}")
fi

# Thread caps for helpers; the trainer sets torch threads per worker from threads_per_worker.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

exec sdn-dist train "${args[@]}"
