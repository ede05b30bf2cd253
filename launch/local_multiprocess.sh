#!/usr/bin/env bash
# Runs P training processes on this machine (CPU, gloo collectives on loopback), e.g. to check
# multi-host behaviour without a cluster:  launch/local_multiprocess.sh 2 runs/mp [--config.x=y]
set -euo pipefail
procs=${1:?number of processes}; workdir=${2:?workdir}; shift 2
port=$((20000 + RANDOM % 20000))
export XLA_FLAGS=${XLA_FLAGS:---xla_force_host_platform_device_count=2}
pids=()
for ((i = 0; i < procs; i++)); do
  python -m ppd_jax.train --config=configs/ppd.py:demo --workdir="$workdir" \
    --coordinator_address=127.0.0.1:$port --num_processes="$procs" --process_id=$i "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
