#!/usr/bin/env bash
# Several processes without a scheduler JAX knows (bare machines, Kubernetes pods): run this
# on every machine with its own PROCESS_ID; process 0's address is the coordinator.
#   COORDINATOR=10.0.0.1:1234 NUM_PROCESSES=2 PROCESS_ID=0 launch/multiprocess.sh \
#       configs/ddpm.py /shared/workdirs/ddpm [FLAGS...]
# CPU-only machines add --cpu_collectives=gloo. The same values may come from the
# environment as DIFFAX_COORDINATOR_ADDRESS, DIFFAX_NUM_PROCESSES and DIFFAX_PROCESS_ID.
set -euo pipefail
config=${1:?usage: launch/multiprocess.sh CONFIG WORKDIR [FLAGS...]}
workdir=${2:?usage: launch/multiprocess.sh CONFIG WORKDIR [FLAGS...]}
shift 2
: "${COORDINATOR:?set COORDINATOR=HOST:PORT}" "${NUM_PROCESSES:?}" "${PROCESS_ID:?}"
exec python -m diffax_lab.main --config="$config" --workdir="$workdir" \
  --coordinator_address="$COORDINATOR" --num_processes="$NUM_PROCESSES" \
  --process_id="$PROCESS_ID" "$@"
