#!/usr/bin/env bash
# Runs the same command on every worker of a TPU pod slice; the workdir must be shared (gs://...).
#   launch/tpu_pod.sh TPU_NAME ZONE configs/ppd.py:demo gs://bucket/runs/ppd [--config.x=y]
set -euo pipefail
tpu=${1:?TPU name}; zone=${2:?zone}; config=${3:?config}; workdir=${4:?workdir}; shift 4
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command \
  "cd ppd_jax && python -m ppd_jax.train --config=$config --workdir=$workdir $*"
