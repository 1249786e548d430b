#!/usr/bin/env bash
# Run a recipe as N JAX processes on this machine (CPU, gloo collectives): the multi-host code
# path without a cluster. Process 0 hosts the coordinator, prints progress and writes the
# outputs; the others log to ${BDJAX_LOG_DIR:-/tmp}/bdjax-proc-<i>.log.
#   launch/multiprocess.sh N RECIPE [--config.key=value ...]
set -euo pipefail
n="${1:?usage: launch/multiprocess.sh N RECIPE [--config.key=value ...]}"
recipe="${2:?usage: launch/multiprocess.sh N RECIPE [--config.key=value ...]}"
shift 2
port="${BDJAX_PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
logs="${BDJAX_LOG_DIR:-/tmp}"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT INT TERM
for ((i = n - 1; i >= 0; i--)); do
  cmd=(python -m bdjax.main "--config=${recipe}" "$@" "--coordinator=127.0.0.1:${port}" "--num_processes=${n}"
       "--process_id=${i}")
  echo "+ ${cmd[*]}" >&2
  if ((i == 0)); then
    "${cmd[@]}" &
  else
    "${cmd[@]}" >"${logs}/bdjax-proc-${i}.log" 2>&1 &
  fi
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
trap - EXIT INT TERM
if ((status != 0)); then
  echo "launch/multiprocess.sh: a process failed (exit ${status}); see ${logs}/bdjax-proc-*.log" >&2
fi
exit "$status"
