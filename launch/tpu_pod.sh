#!/usr/bin/env bash
# Runs the same command on every worker of a TPU pod slice; the workdir must be shared (gs://...).
#   launch/tpu_pod.sh TPU_NAME ZONE configs/ppd.py:demo gs://bucket/runs/ppd [--config.x=y]
# Each worker needs `pip install -e ".[tpu,gcs]"` (gcsfs: the gs:// backend of etils.epath, through
# which metrics.jsonl, config.json and TensorBoard events reach the bucket; Orbax writes the
# checkpoints there itself, with tensorstore). The VM's service account must be able to write to
# the bucket: each worker writes and deletes a probe file in the workdir at start-up and stops
# within a minute, naming the path, when it cannot.
set -euo pipefail
tpu=${1:?TPU name}; zone=${2:?zone}; config=${3:?config}; workdir=${4:?workdir}; shift 4
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command \
  "cd ppd_jax && python -m ppd_jax.train --config=$config --workdir=$workdir $*"
