"""``--mode=eval``: the held-out denoising loss of the EMA weights on the test split, or a
classifier's test accuracy (clean, and on x_t at config.eval.times).

Written to ``DIR/eval/step_NNNNNN.json`` with the number of images used. Sample-quality
metrics (Fréchet distance, KID, precision/recall, bits/dim) are not computed here yet.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from diffax_lab import data
from diffax_lab.data import pipeline
from diffax_lab.diffusion import process
from diffax_lab.experiment import Experiment
from diffax_lab.sampling import restore_latest
from diffax_lab.train import prepare


def write_report(workdir: str, step: int, report: dict) -> str:
    path = os.path.join(workdir, "eval", f"step_{step:06d}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
    os.replace(tmp, path)
    logging.info("Eval at step %d: %s -> %s", step, report, path)
    return path


def test_batches(config):
    """The test split, cut to eval.num_examples in whole batches of eval.batch_size."""
    imgs, labels = data.load_split(config.data, "test")
    n = min(config.eval.num_examples, imgs.shape[0])
    bs = min(config.eval.batch_size, n)
    n = n // bs * bs  # whole batches: one compiled shape
    return imgs[:n], labels[:n], bs


def evaluate_classifier(config, workdir: str, mesh) -> dict:
    """Test accuracy (EMA weights) on clean images and on x_t at each t in eval.times."""
    from diffax_lab.classifier import ClassifierExperiment

    exp = ClassifierExperiment(config, mesh)
    imgs, labels, bs = test_batches(config)
    state, step = restore_latest(exp, workdir)
    times = tuple(config.eval.get("times", (0.0,)))
    if config.classifier.noise == "none":
        times = (0.0,)

    @jax.jit
    def correct(params, x_u8, y, t, key):
        x0 = pipeline.to_model_range(x_u8)
        ab = exp.schedule.alpha_bar_at(jnp.full((x0.shape[0],), t))
        x_t = process.q_sample(x0, ab, jax.random.normal(key, x0.shape))
        x_t = jnp.where(t > 0, x_t, x0)  # t = 0: the clean images themselves
        logits = exp.model.apply({"params": params}, x_t, jnp.full((x0.shape[0],), t))
        return jnp.sum(jnp.argmax(logits, -1) == y)

    key = jax.random.PRNGKey(config.sample.seed)
    report = {"step": step, "split": "test", "num_examples": len(imgs), "ema": True}
    for t in times:
        hits = sum(
            int(
                correct(
                    state["ema_params"],
                    imgs[i : i + bs],
                    labels[i : i + bs],
                    t,
                    jax.random.fold_in(key, i),
                )
            )
            for i in range(0, len(imgs), bs)
        )
        report["test_accuracy" if t == 0 else f"test_accuracy_t{t:g}"] = hits / len(imgs)
    write_report(workdir, step, report)
    return report


def evaluate(config, workdir: str) -> dict:
    workdir, mesh = prepare(config, workdir, "eval")
    if config.get("task") == "classifier":
        return evaluate_classifier(config, workdir, mesh)
    exp = Experiment(config, mesh)
    imgs, labels, bs = test_batches(config)
    n = len(imgs)
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
    write_report(workdir, step, report)
    return report
