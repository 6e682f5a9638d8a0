#!/usr/bin/env bash
# Single host, all visible devices (one process drives every local GPU, or the CPU):
# data parallel over one mesh axis.
#   launch/local.sh configs/ddpm.py workdirs/ddpm [--config.train.batch_size=256 ...]
# Choose GPUs with CUDA_VISIBLE_DEVICES=0,1,2,3; the global batch must divide by their count.
set -euo pipefail
config=${1:?usage: launch/local.sh CONFIG WORKDIR [FLAGS...]}
workdir=${2:?usage: launch/local.sh CONFIG WORKDIR [FLAGS...]}
shift 2
exec python -m diffax_lab.main --config="$config" --workdir="$workdir" \
  --jax_cache_dir="${JAX_CACHE_DIR:-$HOME/.cache/diffax_lab/jax}" "$@"
