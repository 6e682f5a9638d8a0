#!/usr/bin/env bash
# The one-command GPU suite (benchmarks/gpu_suite.py says what it measures): about 5 minutes
# on one H100/H200-class GPU.
#     bash benchmarks/gpu_suite.sh [OUT_DIR] [--quick] [--peer_modes=fp32,bf16,bf16_compile]
# Writes OUT_DIR/suite.json and OUT_DIR/suite.md (default ./gpu_suite_out).
# Needs jax (CUDA), flax, optax, ml_collections; the PyTorch peer also torch and diffusers
# (skipped with the reason printed when they are missing). Packages missing from the
# machine can come as wheels on PYTHONPATH, or as *.whl files in $DIFFAX_WHEELS (default:
# the repository's .whl/), which are unpacked into OUT_DIR/_site (pure-Python wheels only).
set -euo pipefail
out="${1:-gpu_suite_out}"
case "$out" in --*) out=gpu_suite_out ;; *) shift || true ;; esac
mkdir -p "$out"
out="$(cd "$out" && pwd)"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
py="${PYTHON:-python3}"
wheels="${DIFFAX_WHEELS:-$repo/.whl}"
if [ -d "$wheels" ] && ls "$wheels"/*.whl >/dev/null 2>&1; then
  need=$("$py" - "$wheels" <<'PY'
import importlib.util, os, sys
names = {"ml_collections": "ml_collections", "diffusers": "diffusers",
         "importlib_metadata": "importlib_metadata", "zipp": "zipp"}
missing = [m for m in names if importlib.util.find_spec(m) is None]
print(" ".join(missing))
PY
)
  if [ -n "$need" ]; then
    echo "unpacking wheels from $wheels for: $need"
    "$py" - "$wheels" "$out/_site" $need <<'PY'
import glob, os, sys, zipfile
wheels, site, need = sys.argv[1], sys.argv[2], sys.argv[3:]
os.makedirs(site, exist_ok=True)
for whl in sorted(glob.glob(os.path.join(wheels, "*.whl"))):
    dist = os.path.basename(whl).split("-")[0].lower()
    if dist in need:
        zipfile.ZipFile(whl).extractall(site)
        print("  ", os.path.basename(whl))
PY
    export PYTHONPATH="$out/_site${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
"$py" -c "import jax; print('jax', jax.__version__, jax.devices())"
exec "$py" -m benchmarks.gpu_suite --out "$out" "$@"
