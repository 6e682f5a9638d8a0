#!/usr/bin/env bash
# Every notebooks/NN_*.py at its full-size defaults on one GPU, all at once, rendered to
# Markdown (what `make notebooks` renders, one notebook after the other, into docs/notebooks):
#
#     bash benchmarks/gpu_notebooks.sh [--small] [--limit SECONDS] [--jobs N] [NAME ...]
#
# NAME: 01_forward_process or notebooks/01_forward_process.py (default: every notebook).
# --small: each notebook's CI size (`-p small True`) on the tests' fake Fashion-MNIST and
#   the CPU: a dry run of this whole script in a few minutes.
# --limit: seconds the whole script may take (default 510, for a 540-second device call;
#   NB_LIMIT). Each notebook is interrupted so that it ends 45 s before that, then rendered:
#   a notebook stopped at the limit keeps the cells it ran.
# --jobs: notebooks (lanes) at a time (default 1; 0 = all at once). All eight at once on one
# H200 failed: 20-25 processes time-sliced the GPU and each step took seconds
# (docs/BENCHMARKS.md, "Notebook ablations").
#
# Each notebook runs in its own Jupyter kernel (papermill) at its own defaults (nothing is
# injected but --small's parameters), with the kernel's working directory NB_WORK/work/NAME
# (default /tmp/nbrun/work/NAME): its relative `root` ("workdirs/...") and every other
# relative path land there, so notebooks share no workdir and must train what they need.
# NB_LANES="03_samplers+04_guidance" runs those two one after the other in one directory.
# The GPU is shared: each process may take XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.1) of
# its memory, allocated as needed. XLA_FLAGS gets NB_XLA_FLAGS (default: none, XLA's own
# defaults). Never --xla_gpu_autotune_level=0: it saved 3 s of a 18.5 s compile and made the
# U-Net of configs/ddpm.py:cpu 11x slower to train and 99x slower forward on an H200 (cuDNN's
# first algorithm instead of the fastest; docs/BENCHMARKS.md, "Notebook ablations"). It,
# not time-slicing alone, is why the earlier all-at-once runs took seconds per step.
#
# Missing Python packages (papermill, nbconvert, jupytext, ipykernel, ml_collections, ...)
# are installed from the repository's .whl/ (NB_WHEELS) into NB_WORK/site. Fashion-MNIST comes from
# $DIFFAX_DATA_DIR, the Debian package (/usr/share/datasets/fashion-mnist) or the
# repository's .gpu_data/fashion-mnist, in that order. On the device machine:
#     run(command="bash benchmarks/gpu_notebooks.sh", carry=[".whl", ".gpu_data"], timeout_s=540)
#
# Results go to $OUT (default build/gpu_notebooks), at most 8 files since the device tool
# returns no more: summary.txt (one line per notebook: status, exit code, seconds, cells
# run), nvidia-smi.txt, and notebooks.tar.gz (split into notebooks.tar.gz.NN parts of
# 15 MiB when larger) holding notebooks/NAME.md + NAME_files/ (nbconvert's Markdown),
# notebooks/NAME.ipynb (the executed notebook), logs/NAME.log and logs/gpu_util.csv.
# snapshot.tar.gz (the executed notebooks and logs, every 60 s) is there only if the script
# was stopped before its end. To publish: tar xzf notebooks.tar.gz (cat the parts first),
# cp -r notebooks/*.md notebooks/*_files docs/notebooks/, ruff format docs/notebooks.
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
small=0
limit="${NB_LIMIT:-}"
jobs=1
names=()
while [ $# -gt 0 ]; do
  case "$1" in
    --small) small=1 ;;
    --limit) limit="$2"; shift ;;
    --limit=*) limit="${1#*=}" ;;
    --jobs) jobs="$2"; shift ;;
    --jobs=*) jobs="${1#*=}" ;;
    -h | --help) sed -n '2,/^set /{/^set /d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
    -*) echo "gpu_notebooks.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) n="$(basename "$1" .py)"
       if [ ! -f "$repo/notebooks/$n.py" ]; then
         echo "gpu_notebooks.sh: no notebook notebooks/$n.py" >&2; exit 2
       fi
       names+=("$n") ;;
  esac
  shift
done
[ -n "$limit" ] || limit=$([ "$small" = 1 ] && echo 1800 || echo 510)
case "$limit$jobs" in *[!0-9]*) echo "gpu_notebooks.sh: --limit and --jobs take whole numbers" >&2; exit 2 ;; esac
if [ ${#names[@]} -eq 0 ]; then
  for f in "$repo"/notebooks/[0-9][0-9]_*.py; do names+=("$(basename "$f" .py)"); done
fi

start=$(date +%s)
deadline=$((start + limit))
margin=45 # seconds kept after the notebooks for rendering and packing
py="${PYTHON:-python3}"
py="$("$py" -c 'import sys; print(sys.executable)')" || { echo "no python: $py" >&2; exit 2; }
work="${NB_WORK:-/tmp/nbrun}"
out="${OUT:-$repo/build/gpu_notebooks}"
case "$work" in /tmp/?* | /*/*/?*) ;; *) echo "gpu_notebooks.sh: NB_WORK=$work is too close to /" >&2; exit 2 ;; esac
rm -rf "$work"
mkdir -p "$work"/{build,work,res/notebooks,res/logs,jupyter/kernels/python3,runtime,ipython,mpl} "$out"
res="$work/res"
cd "$repo"
say() { echo "[$(($(date +%s) - start)) s] $*"; }

# 1. Packages: install the wheels only when something is missing (never on a complete env).
need="papermill nbconvert jupytext ipykernel nbformat ml_collections"
wheels="${NB_WHEELS:-$repo/.whl}"
site_share=""
check="import importlib.util as u
def have(n):
    try:
        return u.find_spec(n) is not None
    except Exception:
        return False
print(' '.join(n for n in '$need'.split() if not have(n)))"
missing="$("$py" -c "$check")"
if [ -n "$missing" ]; then
  say "installing $wheels/*.whl for: $missing"
  if ! ls "$wheels"/*.whl >/dev/null 2>&1; then
    echo "gpu_notebooks.sh: $missing missing and no wheels in $wheels (carry .whl)" >&2; exit 3
  fi
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$work/site" "$wheels"/*.whl || { echo "wheel install failed" >&2; exit 3; }
  export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
  site_share="$work/site/share/jupyter"
  missing="$("$py" -c "$check")"
  [ -z "$missing" ] || { echo "gpu_notebooks.sh: still missing after the wheels: $missing" >&2; exit 3; }
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

# 2. A Jupyter kernel of this very interpreter and environment, found through JUPYTER_PATH.
cat >"$work/jupyter/kernels/python3/kernel.json" <<EOF
{"argv": ["$py", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
 "display_name": "Python 3 (diffax_lab)", "language": "python",
 "env": {"PYTHONPATH": "$PYTHONPATH"}, "metadata": {"debugger": false}}
EOF
# (and nbconvert's templates, which pip --target puts under site/share/jupyter)
export JUPYTER_PATH="$work/jupyter${site_share:+:$site_share}" JUPYTER_RUNTIME_DIR="$work/runtime"
export JUPYTER_CONFIG_DIR="$work/jupyter/config" JUPYTER_PLATFORM_DIRS=1
export IPYTHONDIR="$work/ipython" MPLCONFIGDIR="$work/mpl" PYTHONUNBUFFERED=1
unset MPLBACKEND # the kernel's inline backend draws the figures into the notebook

# 3. JAX on a shared GPU, the compilation cache, the data.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.1}"
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }${NB_XLA_FLAGS:-}"
export DIFFAX_JAX_CACHE="${DIFFAX_JAX_CACHE:-$work/jax_cache}"
if [ -n "$XLA_FLAGS" ] && ! "$py" -c "import jax; jax.devices()" >/dev/null 2>&1; then
  say "this XLA refuses XLA_FLAGS='$XLA_FLAGS'; running with XLA's defaults"
  export XLA_FLAGS=""
fi
params=()
if [ "$small" = 1 ]; then
  export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
  "$py" -c "from tests.helpers import write_fake_idx; write_fake_idx('$work/data', n_train=64, n_test=32)" ||
    exit 3
  export DIFFAX_DATA_DIR="$work/data"
  params=(-p small True -p data_dir "$work/data") # $DIFFAX_DATA_DIR for the others
elif [ -z "${DIFFAX_DATA_DIR:-}" ] && [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if [ -d "$repo/.gpu_data/fashion-mnist" ]; then
    export DIFFAX_DATA_DIR="$repo/.gpu_data/fashion-mnist"
  else
    echo "gpu_notebooks.sh: no Fashion-MNIST: set DIFFAX_DATA_DIR or carry .gpu_data" >&2; exit 3
  fi
fi
say "data: ${DIFFAX_DATA_DIR:-/usr/share/datasets/fashion-mnist}; XLA_FLAGS=$XLA_FLAGS"

# 4. Fail here, not in eight kernels: the imports, the device, the kernel spec.
"$py" - "$small" <<'PY' 2>&1 | tee "$res/logs/preflight.log"
import sys
import jax, jupytext, nbconvert, papermill, ipykernel  # noqa: F401
from jupyter_client.kernelspec import KernelSpecManager
import diffax_lab.api  # noqa: F401
print("jax", jax.__version__, jax.devices(), "| papermill", papermill.__version__,
      "| nbconvert", nbconvert.__version__, "| jupytext", jupytext.__version__,
      "| ipykernel", ipykernel.__version__)
print("kernel python3:", KernelSpecManager().get_kernel_spec("python3").argv)
if sys.argv[1] != "1" and jax.default_backend() != "gpu":
    sys.exit(f"no GPU: JAX's backend is {jax.default_backend()!r}; stopping before the notebooks")
PY
[ "${PIPESTATUS[0]}" = 0 ] || { echo "gpu_notebooks.sh: preflight failed" >&2; exit 3; }

# 5. Watchers: GPU memory and load every 10 s, nvidia-smi every 2.5 min, and a
#    snapshot of the executed notebooks every 60 s (what comes back if the call is cut).
watchers=()
every() { # SECONDS COMMAND...: runs COMMAND every SECONDS until killed (its sleep too)
  local s=$1
  shift
  trap 'kill $z 2>/dev/null; exit 0' TERM
  while :; do
    sleep "$s" &
    z=$!
    wait $z
    "$@"
  done
}
snapshot() {
  tar -czf "$out/snapshot.tar.gz.tmp" -C "$res" . 2>/dev/null
  mv -f "$out/snapshot.tar.gz.tmp" "$out/snapshot.tar.gz"
}
smi() { { echo; date -u; nvidia-smi; } >>"$res/nvidia-smi.txt" 2>&1; }
if command -v nvidia-smi >/dev/null; then
  { date -u; nvidia-smi; } >"$res/nvidia-smi.txt" 2>&1
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,memory.total \
    --format=csv -l 10 >"$res/logs/gpu_util.csv" 2>&1 </dev/null &
  watchers+=($!)
  every 150 smi >/dev/null 2>&1 </dev/null &
  watchers+=($!)
fi
every 60 snapshot >/dev/null 2>&1 </dev/null &
watchers+=($!)

# 6. The notebooks: one lane each (NB_LANES joins names with '+'), all lanes at once.
cells_run() { # "run/total" code cells of an executed notebook
  "$py" - "$1" <<'PY' 2>/dev/null || echo "?"
import json, sys
cells = [c for c in json.load(open(sys.argv[1]))["cells"] if c["cell_type"] == "code"]
print(f"{sum(c.get('execution_count') is not None for c in cells)}/{len(cells)}")
PY
}

run_one() { # NAME LANE_DIR: jupytext -> papermill (interrupted at the deadline) -> nbconvert
  local name="$1" dir="$2" log="$res/logs/$1.log" t0 rc budget status
  t0=$(date +%s)
  budget=$((deadline - margin - t0))
  if [ "$budget" -lt 10 ]; then
    echo "$name skipped: no time left" >>"$res/summary.txt"; return
  fi
  {
    "$py" -m jupytext --to ipynb --output "$work/build/$name.ipynb" "notebooks/$name.py" &&
      timeout -s INT -k 20 "$budget" "$py" -m papermill --cwd "$dir" -k python3 --log-output \
        --no-progress-bar "${params[@]}" \
        "$work/build/$name.ipynb" "$res/notebooks/$name.ipynb"
  } >"$log" 2>&1
  rc=$?
  case $rc in 0) status=ok ;; 124 | 137) status=timeout ;; *) status=failed ;; esac
  if [ -f "$res/notebooks/$name.ipynb" ]; then
    PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" "$py" -m benchmarks.terminal_streams \
      "$res/notebooks/$name.ipynb" >>"$log" 2>&1
    "$py" -m nbconvert --to markdown --output-dir "$res/notebooks" --output "$name" \
      "$res/notebooks/$name.ipynb" >>"$log" 2>&1 || status="$status,render-failed"
  fi
  printf '%-24s %-8s rc=%-3s %4d s  cells %s\n' "$name" "$status" "$rc" \
    $(($(date +%s) - t0)) "$(cells_run "$res/notebooks/$name.ipynb")" >>"$res/summary.txt"
  echo "[$(($(date +%s) - start)) s] $name: $status (rc $rc)"
}

run_lane() { # NAME+NAME...: one after the other in one shared root
  local lane="$1" dir="$work/work/${1%%+*}" name
  mkdir -p "$dir"
  for name in ${lane//+/ }; do run_one "$name" "$dir"; done
}

lanes=()
declare -A grouped=()
for lane in ${NB_LANES:-}; do
  members=()
  for n in ${lane//+/ }; do
    for m in "${names[@]}"; do [ "$m" = "$n" ] && members+=("$n") && grouped[$n]=1; done
  done
  [ ${#members[@]} -gt 0 ] && lanes+=("$(IFS=+; echo "${members[*]}")")
done
for n in "${names[@]}"; do [ -n "${grouped[$n]:-}" ] || lanes+=("$n"); done

say "${#lanes[@]} lanes: ${lanes[*]}; notebooks interrupted at $((limit - margin)) s"
pids=()
for lane in "${lanes[@]}"; do
  if [ "$jobs" -gt 0 ]; then
    while [ "$(jobs -rp | wc -l)" -ge $((jobs + ${#watchers[@]})) ]; do wait -n; done
  fi
  run_lane "$lane" &
  pids+=($!)
done
wait "${pids[@]}"

# 7. Pack what comes back.
for p in "${watchers[@]}"; do kill "$p" 2>/dev/null; done
wait 2>/dev/null
if command -v nvidia-smi >/dev/null; then { echo; date -u; nvidia-smi; } >>"$res/nvidia-smi.txt" 2>&1; fi
sort -o "$res/summary.txt" "$res/summary.txt"
{
  echo "# $(date -u '+%F %H:%M UTC'), $(($(date +%s) - start)) s, limit $limit s, small=$small"
  cat "$res/summary.txt"
} >"$out/summary.txt"
cp "$out/summary.txt" "$res/summary.txt"
[ -f "$res/nvidia-smi.txt" ] && cp "$res/nvidia-smi.txt" "$out/nvidia-smi.txt"
rm -f "$out"/notebooks.tar.gz*
tar -czf "$out/notebooks.tar.gz" -C "$res" .
if [ "$(stat -c %s "$out/notebooks.tar.gz")" -gt $((15 * 1024 * 1024)) ]; then
  split -b 15M -d "$out/notebooks.tar.gz" "$out/notebooks.tar.gz." && rm "$out/notebooks.tar.gz"
fi
rm -f "$out/snapshot.tar.gz" "$out/snapshot.tar.gz.tmp"
cat "$out/summary.txt"
for f in "$res"/logs/[0-9][0-9]_*.log; do
  n="$(basename "$f" .log)"
  grep -q "^$n *ok " "$res/summary.txt" || { echo "== $n: last lines of its log"; tail -n 25 "$f"; }
done
ls -la "$out"
