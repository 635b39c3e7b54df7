#!/usr/bin/env bash
# A TPU VM pod slice: the same command on every host; jax.distributed detects the slice.
#   launch/tpu_vm.sh TPU_NAME ZONE CONFIG WORKDIR [extra flags...]
#   launch/tpu_vm.sh my-v4-32 us-central2-b configs/fcos_r18.py:aitod,dfr gs://bucket/runs/fcos_dfr
# Assumes the repository is checked out and installed (pip install -e .) in ~/dfrdet_jax on every
# host, and the data set is readable from every host. The workdir should be a bucket path.
set -euo pipefail
tpu="$1"; zone="$2"; config="$3"; workdir="$4"; shift 4
extra=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
  "cd ~/dfrdet_jax && python -m dfrdet_jax.main --config '$config' --workdir '$workdir' --mode train --config.distributed.mode=on$extra"
