"""``--mode=eval``: the held-out denoising loss of the EMA weights on the test split.

Written to ``DIR/eval/step_NNNNNN.json`` with the number of images used. Sample-quality
metrics (Fréchet distance, KID, precision/recall, bits/dim) are not computed here yet.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from absl import logging

from diffax_lab import data
from diffax_lab.data import pipeline
from diffax_lab.experiment import Experiment
from diffax_lab.sampling import restore_latest
from diffax_lab.train import prepare


def evaluate(config, workdir: str) -> dict:
    workdir, mesh = prepare(config, workdir, "eval")
    exp = Experiment(config, mesh)
    imgs, labels = data.load_split(config.data, "test")
    n = min(config.eval.num_examples, imgs.shape[0])
    bs = min(config.eval.batch_size, n)
    n = n // bs * bs  # whole batches: one compiled shape
    state, step = restore_latest(exp, workdir)
    null = config.model.num_classes

    @jax.jit
    def batch_loss(params, x_u8, y, key):
        fn = exp.model_fn(params, y if null else None)
        return exp.loss_fn(fn, pipeline.to_model_range(x_u8), key)

    key = jax.random.PRNGKey(config.sample.seed)
    results = []
    for b in range(n // bs):
        sl = slice(b * bs, (b + 1) * bs)
        loss, aux = batch_loss(
            state["ema_params"], imgs[sl], labels[sl], jax.random.fold_in(key, b)
        )
        results.append(jax.device_get({"loss": loss, **aux}))
    report = {k: float(np.nanmean([r[k] for r in results])) for k in results[0]}
    report = {
        "step": step,
        "split": "test",
        "num_examples": n,
        "ema": True,
        **{f"test_{k}": v for k, v in report.items()},
    }
    path = os.path.join(workdir, "eval", f"step_{step:06d}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    logging.info("Eval at step %d on %d test images: %s -> %s", step, n, report, path)
    return report
