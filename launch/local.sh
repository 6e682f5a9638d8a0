#!/usr/bin/env bash
# Single host, all visible devices (GPUs or CPU): data parallel over one mesh axis.
#   launch/local.sh configs/ddpm.py workdirs/ddpm [--config.train.batch_size=256 ...]
# Multi-host launchers (SLURM, TPU VM pods) are not written yet; see the README's status.
set -euo pipefail
config=${1:?usage: launch/local.sh CONFIG WORKDIR [FLAGS...]}
workdir=${2:?usage: launch/local.sh CONFIG WORKDIR [FLAGS...]}
shift 2
exec python -m diffax_lab.main --config="$config" --workdir="$workdir" "$@"
