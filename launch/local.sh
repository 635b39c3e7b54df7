#!/usr/bin/env bash
# One machine, every local accelerator (or the CPU): a single process; jax sees all local GPUs
# and the train step shards the global batch over them.
#   launch/local.sh CONFIG WORKDIR [extra flags...]
#   launch/local.sh configs/fcos_r18.py:aitod,dfr /data/runs/fcos_dfr --config.train.batch_size=16
set -euo pipefail
config="$1"; workdir="$2"; shift 2
exec python -m dfrdet_jax.main --config "$config" --workdir "$workdir" --mode train "$@"
