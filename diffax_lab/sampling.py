"""``--mode=sample``: images from the latest checkpoint's EMA weights, and the two strips
the lectures draw (forward noising of one image; x_t along one reverse trajectory)."""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging

from diffax_lab import checkpointing, data, images
from diffax_lab.classifier import check_guidance_classifier, load_classifier
from diffax_lab.data import pipeline
from diffax_lab.diffusion import process
from diffax_lab.experiment import Experiment
from diffax_lab.train import prepare


def restore_latest(exp: Experiment, workdir: str, step: int = 0):
    """(state, step) of the newest good checkpoint, or of ``step`` when it is > 0."""
    ckpt = checkpointing.Checkpointer(workdir, exp.config.train.keep_checkpoints)
    if step:
        if step not in ckpt.all_steps():
            ckpt.close()
            raise FileNotFoundError(
                f"No checkpoint at step {step} in {ckpt.directory}; it has {ckpt.all_steps()}."
            )
        state = ckpt.restore(step, exp.restore_target)
        ckpt.close()
        return state, step
    state, step = ckpt.restore_latest_good(exp.restore_target)
    ckpt.close()
    if step is None:
        raise FileNotFoundError(
            f"No usable checkpoint in {ckpt.directory}; train first with --mode=train and the "
            "same --workdir."
        )
    return state, step


def forward_strip(exp: Experiment, image_uint8: np.ndarray, num: int, key) -> tuple:
    """One image noised to num evenly spaced times t (t = 0 first), as uint8 frames."""
    T = exp.schedule.num_steps
    steps = np.round(np.linspace(0, T - 1, num - 1)).astype(np.int32)
    x0 = pipeline.to_model_range(np.broadcast_to(image_uint8, (num - 1, *image_uint8.shape)))
    noise = jax.random.normal(key, x0.shape)
    xt = process.q_sample(x0, exp.schedule.alphas_cumprod[steps], noise)
    frames = np.concatenate([image_uint8[None], np.asarray(pipeline.to_uint8(xt))])
    times = np.concatenate([[0.0], np.asarray(exp.schedule.times)[steps]])
    return frames, times


def write_guidance_sweep(exp: Experiment, params, out_dir: str, key) -> str:
    """Rows: guidance strengths (config.sample.sweep_scales); columns: classes; the same x_T
    in every row. The strengths are CFG weights w for a model trained with label dropout,
    else classifier scales s (classifier guidance)."""
    c = exp.config
    classes = tuple(c.sample.labels) or tuple(range(exp.num_labels))
    scales = tuple(c.sample.sweep_scales)
    cfg = c.model.num_classes and c.train.p_uncond > 0
    if not cfg and exp.classifier is None:
        scales = (0.0,)  # a conditional model without CFG: one row
    rows, names = [], []
    for v in scales:
        kw = {"guidance_scale": v} if cfg else {"classifier_scale": v}
        imgs, _, _ = exp.generate(params, len(classes), key, labels=classes, same_noise=True, **kw)
        rows.append(np.asarray(pipeline.to_uint8(imgs)))
        names.append(f"{'w' if cfg else 's'}={v:g}")
    path = os.path.join(out_dir, "guidance_sweep.png")
    images.save_labelled_rows(path, rows, names)
    logging.info(
        "Wrote the guidance sweep (rows %s, columns classes %s) to %s.", names, classes, path
    )
    return path


def attach_guidance_classifier(exp: Experiment, config, mesh) -> None:
    """Loads and checks sample.classifier_workdir's classifier for classifier guidance."""
    classifier_exp, classifier_params = load_classifier(config.sample.classifier_workdir, mesh)
    check_guidance_classifier(exp, classifier_exp)
    if classifier_exp.config.classifier.noise == "none":
        logging.warning(
            "%s is a clean classifier (t = 0): its gradients on noisy x_t guide poorly; "
            "train one with classifier.noise='diffusion' for guidance.",
            config.sample.classifier_workdir,
        )
    exp.attach_classifier(classifier_exp, classifier_params)


def sample(config, workdir: str) -> dict:
    workdir, mesh = prepare(config, workdir, "sample")
    exp = Experiment(config, mesh)
    if config.sample.classifier_scale > 0:  # load and check before anything compiles
        attach_guidance_classifier(exp, config, mesh)
    state, step = restore_latest(exp, workdir)
    key = jax.random.PRNGKey(config.sample.seed)
    out_dir = os.path.join(workdir, "samples")
    s = config.sample
    logging.info(
        "Sampling %d images with %s (%s steps) from step %d%s...",
        s.num,
        s.sampler,
        s.num_steps or exp.schedule.num_steps,
        step,
        f", classifier guidance s={s.classifier_scale:g}" if exp.classifier else "",
    )
    labels = None
    if config.model.cond_dim:  # text-to-image: CLIP text embeddings of the prompts
        from diffax_lab.text2img import TextEncoder

        prompts = list(s.prompts)
        per = max(1, s.num // len(prompts))
        labels = np.repeat(TextEncoder(config.text.clip_dir).embed_texts(prompts), per, axis=0)
    samples, traj, traj_times = exp.generate(
        state["ema_params"], s.num, key, labels=labels, num_trajectory=s.num_strip
    )
    samples_u8 = np.asarray(pipeline.to_uint8(samples))
    stem = f"sample_step_{step:06d}_{s.sampler}_{s.num_steps or exp.schedule.num_steps}"
    if config.model.num_classes and config.train.p_uncond > 0:
        stem += f"_w{s.guidance_scale:g}"
    if exp.classifier:
        stem += f"_s{s.classifier_scale:g}"
    images.save_grid(os.path.join(out_dir, stem + ".png"), samples_u8)
    if jax.process_index() == 0:
        np.savez_compressed(os.path.join(out_dir, stem + ".npz"), images=samples_u8)

    # Reverse strip: x_t fed to the network along the first sample's trajectory, then x_0.
    rev = np.concatenate([np.asarray(pipeline.to_uint8(traj[:, 0])), samples_u8[:1]])
    rev_t = [*traj_times, 0.0]
    # Forward strip: a real test image noised to increasing t (falls back to a sample).
    try:
        real = data.load_split(config.data, "test")[0][0]
    except data.DataError:
        real = samples_u8[0]
    fwd, fwd_t = forward_strip(exp, real, s.num_strip + 1, jax.random.fold_in(key, 1))
    images.save_labelled_rows(os.path.join(out_dir, "forward_strip.png"), [fwd], ["q(x_t|x_0)"])
    images.save_labelled_rows(os.path.join(out_dir, "reverse_strip.png"), [rev], ["p(x_t-1|x_t)"])
    if config.model.cond_dim:  # one row per prompt, the prompt as the row's caption
        rows = [samples_u8[i * per : (i + 1) * per] for i in range(len(prompts))]
        rows = [r for r in rows if len(r) == per]
        path = os.path.join(out_dir, f"{stem}_prompts.png")
        images.save_labelled_rows(path, rows, prompts[: len(rows)])
        logging.info("Wrote the prompt grid (w = %g) to %s.", s.guidance_scale, path)
    if exp.num_labels:
        write_guidance_sweep(exp, state["ema_params"], out_dir, jax.random.fold_in(key, 2))
    logging.info(
        "Forward strip at t = %s; reverse strip at t = %s.",
        np.round(fwd_t, 3).tolist(),
        np.round(rev_t, 3).tolist(),
    )
    logging.info("Wrote %s.png/.npz and the strips to %s.", stem, out_dir)
    return {
        "step": step,
        "grid": os.path.join(out_dir, stem + ".png"),
        "npz": os.path.join(out_dir, stem + ".npz"),
    }
