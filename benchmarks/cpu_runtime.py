"""What ``compilation.configure_cpu_runtime`` is worth: ``benchmarks.cpu_profile`` (ours and
the PyTorch peer, alternating rounds) run in fresh processes with the lab's CPU runtime and
without it (JAX's and glibc's defaults), one after the other, ``--pairs`` times.

    python -m benchmarks.cpu_runtime --config=configs/ddpm.py:tiny [--forward_batch=64] \
        [--iters=10] [--rounds=6] [--pairs=2] [--out=FILE]

The setting is process-wide and is read when JAX creates its CPU client, so the two
variants cannot share a process the way ``cpu_levers``' do; alternating whole processes
lets a shared machine's load fall on both alike. Each process also reports its minor page
faults per train step, ours and PyTorch's (the runtime's mechanism: XLA:CPU's buffers for
each execution come from fresh pages without it). The PyTorch peer runs in the same
process as ours, so it runs under the same allocator settings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from absl import app, flags

from benchmarks.common_flags import print_json

FLAGS = flags.FLAGS
KEYS = (
    "ours_train",
    "ours_forward",
    "torch_train",
    "torch_forward",
    "ratio_train",
    "ratio_forward",
    "ours_train_faults",
    "torch_train_faults",
)


def define_flags():
    flags.DEFINE_string("config", None, "Config file (with :variant), as for cpu_profile.")
    flags.DEFINE_integer("forward_batch", 64, "Batch of the forward-pass measurement.")
    flags.DEFINE_integer("iters", 10, "Timed iterations per round.")
    flags.DEFINE_integer("rounds", 6, "Alternating rounds (ours, PyTorch) in each process.")
    flags.DEFINE_integer("pairs", 2, "Processes per variant, run alternately.")
    flags.DEFINE_string("out", "", "Also write the JSON here.")
    flags.mark_flag_as_required("config")


def run_profile(lab_runtime: bool) -> dict:
    """One ``cpu_profile --noprofile`` process; its JSON result (through ``--out``)."""
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.cpu_profile",
        f"--config={FLAGS.config}",
        f"--forward_batch={FLAGS.forward_batch}",
        f"--iters={FLAGS.iters}",
        f"--rounds={FLAGS.rounds}",
        "--noprofile",
        "--lab_cpu_runtime" if lab_runtime else "--nolab_cpu_runtime",
        f"--out={path}",
    ]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
        with open(path) as f:
            return json.load(f)
    finally:
        os.remove(path)


def main(argv):
    del argv
    runs = {"lab": [], "defaults": []}
    for _ in range(FLAGS.pairs):
        for name in runs:
            result = run_profile(name == "lab")
            runs[name].append(result)
            print(name, json.dumps({"cpu_runtime": result["cpu_runtime"]}), flush=True)
    summary = {}
    for name, results in runs.items():
        rounds = [r for res in results for r in res["rounds"]]
        summary[name] = {k: float(np.median([r[k] for r in rounds])) for k in KEYS}
        summary[name]["cpu_runtime"] = results[0]["cpu_runtime"]
    result = {
        "config": FLAGS.config,
        "train_batch": runs["lab"][0]["train_batch"],
        "forward_batch": FLAGS.forward_batch,
        "rounds_per_variant": FLAGS.pairs * FLAGS.rounds,
        "median": summary,
        "runs": runs,
    }
    print_json({k: v for k, v in result.items() if k != "runs"})
    if FLAGS.out:  # with every process's rounds
        with open(FLAGS.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    define_flags()
    app.run(main)
