#!/usr/bin/env bash
# Run a recipe on every worker of a Cloud TPU VM pod slice (one JAX process per worker; the TPU
# runtime tells jax.distributed the coordinator and process index).
#   launch/tpu_pod.sh TPU_NAME ZONE RECIPE [--config.key=value ...]
# The repository must be at the same path (~/bdjax) on every worker, installed with `pip install -e .`.
set -euo pipefail
tpu="${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE RECIPE [--config.key=value ...]}"
zone="${2:?usage: launch/tpu_pod.sh TPU_NAME ZONE RECIPE [--config.key=value ...]}"
recipe="${3:?usage: launch/tpu_pod.sh TPU_NAME ZONE RECIPE [--config.key=value ...]}"
shift 3
remote="cd ~/bdjax && python -m bdjax.main --config=${recipe}"
for arg in "$@"; do remote+=" $(printf '%q' "$arg")"; done
cmd=(gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "$remote")
echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"
