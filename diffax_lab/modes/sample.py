"""``--mode=sample``: the task's images from the newest checkpoint's EMA weights (for the
diffusion tasks: a grid and .npz, the forward and reverse strips, the guidance sweep).
Takes no lock: it may run while the same workdir trains."""

from __future__ import annotations

import jax

from diffax_lab.modes.common import prepare, restore


def run(config, workdir: str) -> dict:
    workdir, _, task = prepare(config, workdir, "sample")
    task.load_resources(workdir, "sample")  # before anything compiles
    state, step = restore(task, workdir)
    key = jax.random.PRNGKey(config.sample.seed)
    return task.sample(state["ema_params"], workdir, step, key)
