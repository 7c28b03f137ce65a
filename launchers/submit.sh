#!/usr/bin/env bash
# Run: launchers/submit.sh [--no-wait] [--dry-run] [--preset P] [--run-id ID] [--attempt A]
#                          [--out URL] [--set key=value ...]
#
# Submits `sdn-dist train` as a Ray job to the cluster at $RAY_ADDRESS (default
# http://127.0.0.1:8265, e.g. a `ray dashboard launchers/cluster.yaml` tunnel or a
# `kubectl port-forward` to a head's dashboard), uploading this checkout as the working dir.
# The exact command it runs (--dry-run prints it instead):
#
#   ray job submit --address "$RAY_ADDRESS" --working-dir . \
#     --submission-id "<run id>--<attempt>" \
#     --runtime-env-json '<launchers/runtime_env.yaml + env_vars SDN_RUN_ID, SDN_ATTEMPT>' \
#     [--no-wait] -- sdn-dist train --preset <P> --set out=<URL> --set metrics.port=<port> ...
#
#   --preset P     sdn-dist preset (default: $SDN_PRESET or demo)
#   --run-id ID    run id (default: $SDN_RUN_ID or sdn-<preset>-<UTC timestamp>); also the run
#                  directory's name. Reuse the same id (and --out) to resume a run.
#   --attempt A    attempt id (default: $SDN_ATTEMPT or the UTC time, as the trainer's own
#                  default); unique per submission
#   --out URL      run directory (default: runs/<run id>, on the head node). On a multi-node
#                  cluster give shared storage every node sees: s3://bucket/runs/<id>, an NFS path.
#   --set k=v      any config override, passed through (repeatable)
#   --no-wait      return after submission; follow with `ray job logs -f <submission id>`
#   --dry-run      print the command, run nothing
# Env: RAY_ADDRESS; RAY_AUTH_MODE / RAY_AUTH_TOKEN for a cluster with token auth (set to
# token automatically when a token is at hand); SDN_PRESET, SDN_RUN_ID, SDN_ATTEMPT;
# SDN_METRICS_PORT (default 9400: the driver serves sdn_* metrics there on 0.0.0.0; 0 = off);
# PYTHON (default python3, needs PyYAML: it turns runtime_env.yaml into JSON).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
self="$here/$(basename "${BASH_SOURCE[0]}")"
repo="$(cd "$here/.." && pwd)"
cd "$repo"    # --working-dir . is the repository root

address="${RAY_ADDRESS:-http://127.0.0.1:8265}"
preset="${SDN_PRESET:-demo}"
run_id="${SDN_RUN_ID:-}"
attempt="${SDN_ATTEMPT:-}"
out=""
metrics_port="${SDN_METRICS_PORT:-9400}"
python="${PYTHON:-python3}"
wait_flag=()
dry_run=0
sets=()

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$self"; }
need() { [[ $# -ge 2 && -n "$2" ]] || { echo "error: $1 needs a value" >&2; exit 2; }; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --preset)   need "$@"; preset="$2"; shift 2 ;;
    --run-id)   need "$@"; run_id="$2"; shift 2 ;;
    --attempt)  need "$@"; attempt="$2"; shift 2 ;;
    --out)      need "$@"; out="$2"; shift 2 ;;
    --set)      need "$@"; sets+=(--set "$2"); shift 2 ;;
    --no-wait)  wait_flag=(--no-wait); shift ;;
    --dry-run)  dry_run=1; shift ;;
    -h|--help)  usage; exit 0 ;;
    *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

run_id="${run_id:-sdn-${preset}-$(date -u +%Y%m%dT%H%M%SZ)}"
attempt="${attempt:-$(date -u +%Y%m%dT%H%M%S)}"
out="${out:-runs/${run_id}}"
if [[ ! "$run_id" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]]; then
  echo "error: run id '$run_id' may hold only letters, digits, '.', '_' and '-'" >&2; exit 2
fi
if [[ ! "$attempt" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]]; then
  echo "error: attempt '$attempt' may hold only letters, digits, '.', '_' and '-'" >&2; exit 2
fi

# runtime_env.yaml + this submission's run id and attempt, as one JSON object.
runtime_env_json="$(SDN_RUN_ID="$run_id" SDN_ATTEMPT="$attempt" "$python" - "$here/runtime_env.yaml" <<'PY'
import json, os, sys
import yaml
env = yaml.safe_load(open(sys.argv[1])) or {}
env.setdefault("env_vars", {})
env["env_vars"]["SDN_RUN_ID"] = os.environ["SDN_RUN_ID"]
env["env_vars"]["SDN_ATTEMPT"] = os.environ["SDN_ATTEMPT"]
print(json.dumps(env, separators=(",", ":")))
PY
)"

# Ray joins the entrypoint words with shlex.join, so values with globs or braces
# (data.train=/shards/train-*.tar) reach sdn-dist unexpanded.
entry=(sdn-dist train --preset "$preset"
  --set "out=${out}"
  --set "metrics.port=${metrics_port}" --set "metrics.host=0.0.0.0"
  "${sets[@]}")

# Token authentication (Ray >= 2.52): a cluster started with a token answers only requests that
# carry it. The job CLI sends the token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
# ~/.ray/auth_token) only in RAY_AUTH_MODE=token; a cluster without auth ignores it.
if [[ -z "${RAY_AUTH_MODE:-}" ]] && { [[ -n "${RAY_AUTH_TOKEN:-}" ]] \
     || [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]] || [[ -f "${HOME:-/nonexistent}/.ray/auth_token" ]]; }; then
  export RAY_AUTH_MODE=token
fi

cmd=(ray job submit
  --address "$address"
  --working-dir .
  --submission-id "${run_id}--${attempt}"
  --runtime-env-json "$runtime_env_json"
  "${wait_flag[@]}"
  --
  "${entry[@]}")

if [[ "$dry_run" == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
echo "submitting run ${run_id} (attempt ${attempt}) to ${address}; run directory: ${out}" >&2
exec "${cmd[@]}"
