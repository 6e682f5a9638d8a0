"""Plots sample metrics over training steps from the runs' eval reports.

    python -m benchmarks.plot_eval --runs=workdirs/cpu,workdirs/cfg_cpu \
        --names=unconditional,"CFG w=1" --tags=ddim50_w0_s0_n200,ddim50_w1_s0_n200 \
        --out=docs/eval_over_steps.png

Reads DIR/eval/step_NNNNNN_<tag>.json of each run (written by --mode=eval with
eval.judge_workdir; the tag names sampler, steps, guidance and sample count) and draws FD,
KID, precision and recall against the step, with each run's real-data floor dashed.
Needs matplotlib (not a dependency of the lab).
"""

from __future__ import annotations

import glob
import json
import os
import re

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags():
    """Defines this script's flags; called only when it runs as a script, so that
    importing it (tests, notebooks, other benchmarks) defines no global flags."""
    flags.DEFINE_list("runs", None, "Run directories.")
    flags.DEFINE_list("names", None, "Legend names, one per run.")
    flags.DEFINE_list("tags", None, "Report tag per run (step_NNNNNN_<tag>.json).")
    flags.DEFINE_string("out", "docs/eval_over_steps.png", "Output PNG.")
    flags.mark_flags_as_required(["runs", "names", "tags"])


METRICS = (
    ("fd", "Fréchet distance"),
    ("kid", "KID"),
    ("precision", "precision"),
    ("recall", "recall"),
)


def reports(run: str, tag: str) -> list[dict]:
    out = []
    for path in glob.glob(os.path.join(run, "eval", f"step_*_{tag}.json")):
        if re.search(r"step_\d{6}_", os.path.basename(path)):
            with open(path) as f:
                out.append(json.load(f))
    return sorted(out, key=lambda r: r["step"])


def main(argv):
    del argv
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.2))
    for run, name, tag in zip(FLAGS.runs, FLAGS.names, FLAGS.tags, strict=True):
        rs = reports(run, tag)
        if not rs:
            raise app.UsageError(f"No eval reports step_*_{tag}.json in {run}/eval.")
        steps = [r["step"] for r in rs]
        for ax, (key, title) in zip(axes, METRICS, strict=True):
            line = ax.plot(steps, [r[key] for r in rs], marker="o", label=name)[0]
            ax.axhline(rs[-1][f"floor_{key}"], ls="--", color=line.get_color(), lw=0.8)
            ax.set_title(title)
            ax.set_xlabel("training step")
    n_gen, n_real = rs[-1]["num_generated"], rs[-1]["num_real"]
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"{n_gen} samples vs {n_real} real test images, clean-classifier features "
        "(dashed: real train images, the floor)",
        fontsize=9,
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    fig.savefig(FLAGS.out, dpi=110)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
