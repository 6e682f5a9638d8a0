#!/usr/bin/env bash
# Cloud TPU VM pod slice: the same command on every worker through gcloud.
#   TPU_NAME=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh configs/cifar10_ddpm.py \
#       gs://my-bucket/workdirs/cifar [FLAGS...]
# Set: TPU_NAME, ZONE (and PROJECT if not gcloud's default); REPO_DIR, where the repository
# is checked out on every worker (install once with:
#   gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all \
#     --command='git clone <repo> diffax_lab && cd diffax_lab && pip install -e . "jax[tpu]"').
# WORKDIR must be visible to every worker (a gs:// bucket or a shared disk); JAX detects
# the pod's coordinator and process ids itself (--distributed=auto).
set -euo pipefail
config=${1:?usage: launch/tpu_pod.sh CONFIG WORKDIR [FLAGS...]}
workdir=${2:?usage: launch/tpu_pod.sh CONFIG WORKDIR [FLAGS...]}
shift 2
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REPO_DIR=${REPO_DIR:-diffax_lab}
project=()
if [ -n "${PROJECT:-}" ]; then project=(--project="$PROJECT"); fi
extra=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" "${project[@]}" --worker=all \
  --command="cd $REPO_DIR && python -m diffax_lab.main --config=$config --workdir=$workdir$extra"
