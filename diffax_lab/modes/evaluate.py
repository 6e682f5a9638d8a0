"""``--mode=eval``: the evaluators of ``config.eval.metrics`` (else the task's defaults) on
the EMA weights of the newest checkpoint (or ``eval.checkpoint_step``), written to
``DIR/eval/step_NNNNNN.json``; an evaluation that draws samples also to
``DIR/eval/step_NNNNNN_<sampling setting>.json``, so no setting's result is overwritten.
Takes no lock: it may run while the same workdir trains."""

from __future__ import annotations

import json
import os

import jax
from absl import logging

from diffax_lab import evaluators
from diffax_lab.distributed import is_main_process
from diffax_lab.files import write_atomic
from diffax_lab.modes.common import build_evaluators, prepare, restore


def write_report(workdir: str, step: int, report: dict, tag: str = "") -> str:
    """DIR/eval/step_NNNNNN.json (the latest evaluation of that step), or with ``tag``
    DIR/eval/step_NNNNNN_<tag>.json; written atomically."""
    name = f"step_{step:06d}" + (f"_{tag}" if tag else "") + ".json"
    path = os.path.join(workdir, "eval", name)
    if not is_main_process():
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomic(path, json.dumps(report, indent=2))
    logging.info("Eval at step %d: %s -> %s", step, report, path)
    return path


def run(config, workdir: str) -> dict:
    workdir, mesh, task = prepare(config, workdir, "eval")
    task.load_resources(workdir, "eval")
    evals = build_evaluators(task, workdir, mesh, task.selected_metrics())
    state, step = restore(task, workdir, config.eval.get("checkpoint_step", 0))
    ctx = evaluators.Context(task, state["ema_params"], jax.random.PRNGKey(config.sample.seed))
    report = {"step": step, "split": "test", "ema": True}
    for ev in evals:
        report.update(ev.run(ctx))
    write_report(workdir, step, report)
    if ctx.sampled and task.sample_tag():  # one file per sampling setting
        write_report(workdir, step, report, task.sample_tag())
    return report
