"""``--mode=eval``: the held-out denoising loss of the EMA weights on the test split, or a
classifier's test accuracy (clean, and on x_t at config.eval.times).

With ``eval.judge_workdir`` (a clean classifier) it adds the sample metrics of
``eval.num_samples`` samples (the sample section's sampler and guidance) in that
classifier's feature space: Fréchet distance, KID, precision/recall, the accuracy of
labelled samples, and the same figures for real train images (the floor). With
``eval.bpd_num_examples`` it adds bits/dim from the variational bound. Written to
``DIR/eval/step_NNNNNN.json`` with the number of generated and real images used.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from diffax_lab import data, metrics
from diffax_lab.data import pipeline
from diffax_lab.diffusion import process
from diffax_lab.distributed import is_main_process
from diffax_lab.experiment import Experiment
from diffax_lab.metrics.features import reference_features
from diffax_lab.sampling import attach_guidance_classifier, restore_latest
from diffax_lab.train import prepare
from diffax_lab.validation import ConfigError


def write_report(workdir: str, step: int, report: dict, tag: str = "") -> str:
    """DIR/eval/step_NNNNNN.json (the latest evaluation of that step), or with ``tag``
    DIR/eval/step_NNNNNN_<tag>.json."""
    name = f"step_{step:06d}" + (f"_{tag}" if tag else "") + ".json"
    path = os.path.join(workdir, "eval", name)
    if not is_main_process():
        return path
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


def requested_labels(exp: Experiment, n: int):
    """The label asked of each of ``exp.generate``'s first n samples (None if unlabelled)."""
    if not exp.num_labels:
        return None
    labels = tuple(exp.config.sample.labels) or tuple(range(exp.num_labels))
    return np.asarray(labels)[np.arange(n) % len(labels)]


def compare_features(real, fake, eval_config, key) -> dict:
    """FD, KID (mean, std) and precision/recall of fake against real features."""
    e = eval_config
    kid, kid_std = metrics.kernel_distance(
        real, fake, key, num_subsets=e.kid_num_subsets, subset_size=e.kid_subset_size
    )
    precision, recall = metrics.precision_recall(real, fake, k=e.pr_k)
    return {
        "fd": metrics.frechet_distance(
            *metrics.feature_statistics(real), *metrics.feature_statistics(fake)
        ),
        "kid": kid,
        "kid_std": kid_std,
        "precision": precision,
        "recall": recall,
    }


def sample_metrics(exp: Experiment, params, judge, workdir: str, key) -> dict:
    """Sample-quality metrics of ``eval.num_samples`` samples in ``judge``'s feature space,
    against ``eval.num_reference`` real test images (features cached in DIR/eval/cache),
    with the real train images' figures as the floor (``eval.floor``)."""
    c = exp.config
    e = c.eval
    t0 = time.perf_counter()
    samples, _, _ = exp.generate(params, e.num_samples, key)
    sample_s = time.perf_counter() - t0
    fake_u8 = np.asarray(pipeline.to_uint8(samples))
    cache = os.path.join(workdir, "eval", "cache")
    test_u8 = data.load_split(c.data, "test")[0][: e.num_reference]
    real, hit = reference_features(judge, c.data, "test", test_u8, cache)
    fake = judge(fake_u8)
    s = c.sample
    report = {
        "feature_space": judge.name,
        "num_generated": int(len(fake)),
        "num_real": int(len(real)),
        "reference": "test",
        "reference_cached": hit,
        "sampler": s.sampler,
        "sample_steps": s.num_steps or exp.schedule.num_steps,
        "guidance_scale": s.guidance_scale,
        "classifier_scale": s.classifier_scale,
        "sample_seconds": sample_s,
        **compare_features(real, fake, e, key),
    }
    y = requested_labels(exp, len(fake_u8))
    if y is not None:
        report["class_accuracy"] = float(np.mean(judge.predict(fake_u8) == y))
    if e.floor:
        train_u8 = data.load_split(c.data, "train")[0][: e.num_samples]
        train, _ = reference_features(judge, c.data, "train", train_u8, cache)
        floor = compare_features(real, train, e, key)
        report.update({f"floor_{k}": v for k, v in floor.items()})
        report["floor_num_generated"] = int(len(train))
    return report


def bits_per_dim_report(exp: Experiment, params, key) -> dict:
    """Bits/dim of the bound on ``eval.bpd_num_examples`` test images (EMA weights; the
    true labels for class-conditional models), with the reverse variance sample.variance."""
    c = exp.config
    e = c.eval
    imgs, labels = data.load_split(c.data, "test")
    n = min(e.bpd_num_examples, len(imgs))
    bs = min(e.batch_size, n)
    n = n // bs * bs
    conditional = bool(c.model.num_classes)

    def fn(x_t, t, args):
        p, y = args
        return exp.model_fn(p, y if conditional else None)(x_t, t)

    per_image = []
    for b in range(n // bs):
        x0 = pipeline.to_model_range(imgs[b * bs : (b + 1) * bs])
        y = jnp.asarray(labels[b * bs : (b + 1) * bs], jnp.int32)
        per_image.append(
            metrics.bits_per_dim(
                fn,
                exp.schedule,
                x0,
                jax.random.fold_in(key, b),
                prediction=c.diffusion.prediction,
                variance=c.sample.variance,
                num_terms=e.bpd_num_terms or None,
                model_args=(params, y),
            )
        )
    bpd = np.concatenate(per_image)
    return {
        "bpd": float(bpd.mean()),
        "bpd_sem": float(bpd.std(ddof=1) / np.sqrt(len(bpd))) if len(bpd) > 1 else None,
        "bpd_num_examples": int(n),
        "bpd_terms": e.bpd_num_terms or exp.schedule.num_steps,
        "bpd_num_timesteps": exp.schedule.num_steps,
        "bpd_variance": c.sample.variance,
    }


def load_judge(config, mesh):
    """The feature space of the sample metrics, loaded before anything compiles."""
    from diffax_lab.metrics.features import ClassifierFeatures

    judge = ClassifierFeatures(config.eval.judge_workdir, mesh, config.eval.batch_size)
    k = judge.exp.config
    if (k.data.image_size, k.data.channels) != (config.data.image_size, config.data.channels):
        raise ConfigError(
            f"config.eval.judge_workdir={config.eval.judge_workdir!r} classifies "
            f"{k.data.image_size}x{k.data.image_size}x{k.data.channels} images; the model makes "
            f"{config.data.image_size}x{config.data.image_size}x{config.data.channels}."
        )
    return judge


def evaluate_clip(config, workdir: str, mesh) -> dict:
    """Zero-shot test accuracy with "a photo of a {class}" prompts (EMA weights)."""
    from diffax_lab.clip_task import ClipExperiment

    exp = ClipExperiment(config, mesh)
    imgs, labels, bs = test_batches(config)
    state, step = restore_latest(exp, workdir, config.eval.get("checkpoint_step", 0))
    acc = exp.zero_shot_accuracy(state["ema_params"], imgs, labels, bs)
    report = {
        "step": step,
        "split": "test",
        "num_examples": len(imgs),
        "ema": True,
        "prompt": exp.templates[0],
        "zero_shot_accuracy": acc,
    }
    write_report(workdir, step, report)
    return report


def evaluate(config, workdir: str) -> dict:
    workdir, mesh = prepare(config, workdir, "eval")
    if config.get("task") == "classifier":
        return evaluate_classifier(config, workdir, mesh)
    if config.get("task") == "clip":
        return evaluate_clip(config, workdir, mesh)
    exp = Experiment(config, mesh)
    judge = None
    if config.eval.judge_workdir:  # load and check everything before anything compiles
        judge = load_judge(config, mesh)
        if config.sample.classifier_scale > 0:
            attach_guidance_classifier(exp, config, mesh)
    imgs, labels, bs = test_batches(config)
    n = len(imgs)
    state, step = restore_latest(exp, workdir, config.eval.get("checkpoint_step", 0))
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
    if judge is not None:
        sm = sample_metrics(exp, state["ema_params"], judge, workdir, jax.random.fold_in(key, 1))
        report.update(sm)
    if config.eval.bpd_num_examples:
        report.update(bits_per_dim_report(exp, state["ema_params"], jax.random.fold_in(key, 2)))
    write_report(workdir, step, report)
    if judge is not None:  # one file per sampling setting, so no setting's result is lost
        s = config.sample
        tag = (
            f"{s.sampler}{s.num_steps or exp.schedule.num_steps}_w{s.guidance_scale:g}"
            f"_s{s.classifier_scale:g}_n{config.eval.num_samples}"
        )
        write_report(workdir, step, report, tag)
    return report
