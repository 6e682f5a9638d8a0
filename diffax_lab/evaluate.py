"""``--mode=eval``: the held-out denoising loss of the EMA weights on the test split, or a
classifier's test accuracy (clean, and on x_t at config.eval.times).

With ``eval.judge_workdir`` (a clean classifier) it adds the sample metrics of
``eval.num_samples`` samples (the sample section's sampler and guidance) in that
classifier's feature space: Fréchet distance, KID, precision/recall, the accuracy of
labelled samples, and the same figures for real train images (the floor). With
``eval.bpd_num_examples`` it adds bits/dim from the variational bound. A text-to-image
model (``model.cond_dim``) conditions its test loss and bits/dim on the test images' own CLIP
embeddings and always reports the CLIP scores of samples drawn from the class prompts
(``evaluate.text2img_metrics``; the judge's metrics beside them when given). Written to
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


def sampling_info(exp: Experiment, num_generated: int, sample_s: float) -> dict:
    """How the evaluated samples were drawn."""
    s = exp.config.sample
    return {
        "num_generated": int(num_generated),
        "sampler": s.sampler,
        "sample_steps": s.num_steps or exp.schedule.num_steps,
        "guidance_scale": s.guidance_scale,
        "classifier_scale": s.classifier_scale,
        "sample_seconds": sample_s,
    }


def judge_metrics(config, fake_u8: np.ndarray, y, judge, workdir: str, key) -> dict:
    """FD, KID, precision/recall of generated uint8 images in ``judge``'s feature space,
    against ``eval.num_reference`` real test images (features cached in DIR/eval/cache),
    the accuracy of the classes asked (``y``, None for unlabelled samples), and with
    ``eval.floor`` the real train images' figures (the floor)."""
    e = config.eval
    cache = os.path.join(workdir, "eval", "cache")
    test_u8 = data.load_split(config.data, "test")[0][: e.num_reference]
    real, hit = reference_features(judge, config.data, "test", test_u8, cache)
    fake = judge(fake_u8)
    report = {
        "feature_space": judge.name,
        "num_real": int(len(real)),
        "reference": "test",
        "reference_cached": hit,
        **compare_features(real, fake, e, key),
    }
    if y is not None:
        report["class_accuracy"] = float(np.mean(judge.predict(fake_u8) == y))
    if e.floor:
        train_u8 = data.load_split(config.data, "train")[0][: len(fake_u8)]
        train, _ = reference_features(judge, config.data, "train", train_u8, cache)
        floor = compare_features(real, train, e, key)
        report.update({f"floor_{k}": v for k, v in floor.items()})
        report["floor_num_generated"] = int(len(train))
    return report


def sample_metrics(exp: Experiment, params, judge, workdir: str, key) -> dict:
    """Sample-quality metrics (``judge_metrics``) of ``eval.num_samples`` samples drawn with
    the sample section's sampler and guidance."""
    n = exp.config.eval.num_samples
    t0 = time.perf_counter()
    samples, _, _ = exp.generate(params, n, key)
    sample_s = time.perf_counter() - t0
    fake_u8 = np.asarray(pipeline.to_uint8(samples))
    y = requested_labels(exp, len(fake_u8))
    return {
        **sampling_info(exp, len(fake_u8), sample_s),
        **judge_metrics(exp.config, fake_u8, y, judge, workdir, key),
    }


def bits_per_dim_report(exp: Experiment, params, key, conds=None) -> dict:
    """Bits/dim of the bound on ``eval.bpd_num_examples`` test images (EMA weights; the
    true labels for class-conditional models, ``conds[i]`` (the test images' CLIP
    embeddings) for text-conditional ones), with the reverse variance sample.variance.
    A text-conditional figure is -log2 p(x | CLIP(x)): the condition carries information
    about x itself, so it is not comparable with an unconditional model's bits/dim."""
    c = exp.config
    e = c.eval
    imgs, labels = data.load_split(c.data, "test")
    n = min(e.bpd_num_examples, len(imgs))
    bs = min(e.batch_size, n)
    n = n // bs * bs
    conditional = bool(c.model.num_classes)
    if c.model.cond_dim:
        labels = conds

    def fn(x_t, t, args):
        p, y = args
        if c.model.cond_dim:
            return exp.model_fn(p, cond=y)(x_t, t)
        return exp.model_fn(p, y if conditional else None)(x_t, t)

    per_image = []
    for b in range(n // bs):
        x0 = pipeline.to_model_range(imgs[b * bs : (b + 1) * bs])
        y = jnp.asarray(labels[b * bs : (b + 1) * bs])
        y = y if c.model.cond_dim else y.astype(jnp.int32)
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


def text2img_metrics(exp: Experiment, params, encoders, judge, workdir: str, key, test) -> dict:
    """``eval.num_samples`` samples from the class prompts (text2img.class_prompts, in turn):
    their CLIP scores and CLIP zero-shot agreement beside real test images'
    (text2img.clip_report) in the conditioning CLIP's space, and with ``eval.clip_dir`` also
    in an independent CLIP's (keys ``indep_*``); the judge's metrics when given.
    ``encoders``: (conditioning CLIP, independent CLIP or None); ``test``: (images, labels)."""
    from diffax_lab import text2img

    c = exp.config
    e = c.eval
    prompts = text2img.class_prompts(c)
    y = np.arange(e.num_samples) % len(prompts)
    t0 = time.perf_counter()
    samples, _, _ = exp.generate(
        params, e.num_samples, key, labels=encoders[0].embed_texts(prompts)
    )
    sample_s = time.perf_counter() - t0
    fake_u8 = np.asarray(pipeline.to_uint8(samples))
    test_u8, test_y = test
    m = min(e.num_reference, len(test_u8))
    report = {**sampling_info(exp, len(fake_u8), sample_s), "prompt_template": c.text.template}
    for prefix, clip in zip(("", "indep_"), encoders, strict=True):
        if clip is None:
            continue
        real_emb = text2img.cached_image_embeddings(clip, test_u8, "test", workdir)[:m]
        r = text2img.clip_report(
            clip.embed_texts(prompts),
            clip.embed_images(fake_u8),
            y,
            real_emb,
            test_y[:m],
            seed=c.sample.seed,
        )
        report[f"{prefix}clip_dir"] = clip.clip_dir
        report.update({f"{prefix}{k}": v for k, v in r.items()})
    if judge is not None:
        report.update(judge_metrics(c, fake_u8, y, judge, workdir, key))
    return report


def evaluate(config, workdir: str) -> dict:
    workdir, mesh = prepare(config, workdir, "eval")
    if config.get("task") == "classifier":
        return evaluate_classifier(config, workdir, mesh)
    if config.get("task") == "clip":
        return evaluate_clip(config, workdir, mesh)
    exp = Experiment(config, mesh)
    judge = encoders = None
    text = bool(config.model.cond_dim)
    # Load and check everything (CLIPs, judge, guiding classifier) before anything compiles.
    if text:
        from diffax_lab import text2img

        cond_clip = text2img.load_encoder(config)
        other = config.eval.get("clip_dir", "")
        indep = text2img.TextEncoder(other, "config.eval.clip_dir") if other else None
        encoders = (cond_clip, indep)
    if config.eval.judge_workdir:
        judge = load_judge(config, mesh)
        if config.sample.classifier_scale > 0:
            attach_guidance_classifier(exp, config, mesh)
    imgs, labels, bs = test_batches(config)
    n = len(imgs)
    conds = labels  # what conditions each test image's loss: its label, or
    if text:  # the CLIP image embedding of the test image itself (as in training)
        all_test = data.load_split(config.data, "test")
        if int(all_test[1].max()) >= len(config.text.class_names):
            raise ConfigError(
                f"The test labels go up to {int(all_test[1].max())} but config.text.class_names "
                f"names {len(config.text.class_names)} classes; list one name per label."
            )
        test_emb = text2img.cached_image_embeddings(cond_clip, all_test[0], "test", workdir)
        conds = test_emb
    state, step = restore_latest(exp, workdir, config.eval.get("checkpoint_step", 0))
    null = config.model.num_classes

    @jax.jit
    def batch_loss(params, x_u8, y, key):
        fn = exp.model_fn(params, cond=y) if text else exp.model_fn(params, y if null else None)
        return exp.loss_fn(fn, pipeline.to_model_range(x_u8), key)

    key = jax.random.PRNGKey(config.sample.seed)
    results = []
    for b in range(n // bs):
        sl = slice(b * bs, (b + 1) * bs)
        loss, aux = batch_loss(state["ema_params"], imgs[sl], conds[sl], jax.random.fold_in(key, b))
        results.append(jax.device_get({"loss": loss, **aux}))
    report = {k: float(np.nanmean([r[k] for r in results])) for k in results[0]}
    report = {
        "step": step,
        "split": "test",
        "num_examples": n,
        "ema": True,
        **{f"test_{k}": v for k, v in report.items()},
    }
    sample_key = jax.random.fold_in(key, 1)
    if text:
        report.update(
            text2img_metrics(
                exp, state["ema_params"], encoders, judge, workdir, sample_key, all_test
            )
        )
    elif judge is not None:
        report.update(sample_metrics(exp, state["ema_params"], judge, workdir, sample_key))
    if config.eval.bpd_num_examples:
        report.update(
            bits_per_dim_report(
                exp, state["ema_params"], jax.random.fold_in(key, 2), test_emb if text else None
            )
        )
    write_report(workdir, step, report)
    if judge is not None or text:  # one file per sampling setting, so no result is lost
        s = config.sample
        tag = (
            f"{s.sampler}{s.num_steps or exp.schedule.num_steps}_w{s.guidance_scale:g}"
            f"_s{s.classifier_scale:g}_n{config.eval.num_samples}"
        )
        write_report(workdir, step, report, tag)
    return report
