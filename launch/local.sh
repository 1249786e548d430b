#!/usr/bin/env bash
# Run a recipe in one local process (CPU, or every local GPU/TPU through one JAX process).
#   launch/local.sh recipes/generate.py [--config.key=value ...]
set -euo pipefail
recipe="${1:?usage: launch/local.sh RECIPE [--config.key=value ...]}"
shift
cmd=(python -m bdjax.main "--config=${recipe}" "$@")
echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"
