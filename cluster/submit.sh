#!/usr/bin/env bash
# Submit a ray-fedit command to a Ray cluster as a Ray job, from the repository root:
#
#   cluster/submit.sh [--address URL] [--no-wait] [--submission-id ID] [--] COMMAND [ARGS...]
#   cluster/submit.sh run configs/quickstart.yaml federation.rounds=3
#   cluster/submit.sh --address http://127.0.0.1:8265 sweep configs/sweeps/malicious_fraction.yaml
#
# COMMAND is a ray-fedit subcommand (run | sweep | generate | evaluate | report | doctor); the job's
# entrypoint is `ray-fedit COMMAND ARGS...`, run on the head node inside the uploaded working
# directory (this checkout, minus the excludes of cluster/runtime_env.yaml).
#
# Environment:
#   RAY_ADDRESS            dashboard address (default http://127.0.0.1:8265, e.g. a port-forward)
#   RAY_AUTH_TOKEN         the cluster's token, or
#   RAY_AUTH_TOKEN_PATH    a file holding it (default: ~/.ray/auth_token when that file exists)
#   RAY_AUTH_MODE          token (default when a token is found) | disabled
#   RAY_FEDIT_RUNTIME_ENV  runtime env YAML (default cluster/runtime_env.yaml)
#   RAY_BIN                the ray CLI (default: `ray` on PATH)
#
# The token is handed to the ray CLI through the environment only: this script never prints it,
# never puts it on a command line (visible in `ps`), and runs with tracing off.
set -euo pipefail
set +x

usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; }

address="${RAY_ADDRESS:-http://127.0.0.1:8265}"
runtime_env="${RAY_FEDIT_RUNTIME_ENV:-cluster/runtime_env.yaml}"
ray_bin="${RAY_BIN:-ray}"
submit_opts=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --address) address="$2"; shift 2 ;;
    --address=*) address="${1#*=}"; shift ;;
    --no-wait) submit_opts+=(--no-wait); shift ;;
    --submission-id) submit_opts+=(--submission-id "$2"); shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) echo "submit.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) break ;;
  esac
done

if [[ $# -eq 0 ]]; then
  usage >&2
  exit 2
fi
case "$1" in
  run|sweep|generate|evaluate|report|doctor) ;;
  *) echo "submit.sh: '$1' is not a ray-fedit command (run|sweep|generate|evaluate|report|doctor)" >&2
     exit 2 ;;
esac
if [[ ! -f pyproject.toml || ! -d ray_fedit ]]; then
  echo "submit.sh: run it from the repository root (the working directory is uploaded)" >&2
  exit 2
fi
if [[ ! -f "$runtime_env" ]]; then
  echo "submit.sh: runtime env file $runtime_env not found" >&2
  exit 2
fi

# Token: RAY_AUTH_TOKEN wins, then RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token (Ray's own order).
if [[ "${RAY_AUTH_MODE:-}" != "disabled" ]]; then
  if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then
    export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
  elif [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
    if [[ ! -s "$RAY_AUTH_TOKEN_PATH" ]]; then
      echo "submit.sh: RAY_AUTH_TOKEN_PATH names a missing or empty file" >&2
      exit 2
    fi
    export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
  elif [[ -s "${HOME}/.ray/auth_token" ]]; then
    export RAY_AUTH_TOKEN_PATH="${HOME}/.ray/auth_token"
    export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
  else
    echo "submit.sh: no token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token); a" \
      "cluster with token authentication (Ray 2.60's default) will refuse the job" >&2
  fi
fi

echo "submit.sh: ray-fedit $* -> $address (auth: ${RAY_AUTH_MODE:-none})" >&2
exec "$ray_bin" job submit --address "$address" --working-dir . --runtime-env "$runtime_env" \
  ${submit_opts[@]+"${submit_opts[@]}"} -- ray-fedit "$@"
