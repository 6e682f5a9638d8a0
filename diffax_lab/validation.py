"""Config validation: every value is checked before anything loads or compiles.

Each error names the field, the value, the allowed range and, where it helps, the fix.
"""

from __future__ import annotations

import math

from diffax_lab.data import SOURCES
from diffax_lab.diffusion.losses import WEIGHTINGS
from diffax_lab.diffusion.process import PREDICTIONS
from diffax_lab.diffusion.samplers import SAMPLERS, VARIANCES
from diffax_lab.diffusion.schedules import SCHEDULES
from diffax_lab.models import DTYPES
from diffax_lab.models.layers import ACTIVATIONS, DOWNSAMPLES, UPSAMPLES
from diffax_lab.models.unet import TIME_EMBEDDINGS


class ConfigError(ValueError):
    pass


TASKS = ("diffusion", "classifier", "clip")


def _get(config, field):
    node = config
    for part in field.split("."):
        node = node[part]
    return node


def _number(config, field, *, low=None, high=None, low_open=False, high_open=False, integer=False):
    value = _get(config, field)
    kind = "an integer" if integer else "a number"
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (integer and not isinstance(value, int))
    ):
        raise ConfigError(f"config.{field} must be {kind}, got {value!r}.")
    if not math.isfinite(value):
        raise ConfigError(f"config.{field} must be finite, got {value!r}.")
    lo_ok = low is None or (value > low if low_open else value >= low)
    hi_ok = high is None or (value < high if high_open else value <= high)
    if not (lo_ok and hi_ok):
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise ConfigError(f"config.{field}={value!r} is outside the allowed range {interval}.")


def _choice(config, field, choices):
    value = _get(config, field)
    if value not in choices:
        raise ConfigError(f"config.{field}={value!r} must be one of {sorted(choices)}.")


def validate_config(config) -> None:
    """Raises ConfigError naming the first bad field."""
    task = config.get("task", "diffusion")
    if task not in TASKS:
        raise ConfigError(f"config.task={task!r} must be one of {list(TASKS)}.")
    _number(config, "seed", low=0, integer=True)
    _choice(config, "data.source", SOURCES)
    _number(config, "data.image_size", low=1, integer=True)
    _choice(config, "data.channels", (1, 3))
    _number(config, "data.num_examples", low=0, integer=True)
    _choice(config, "data.placement", ("device", "host"))

    m = "model."
    for f in ("base_channels", "num_res_blocks", "attention_heads", "num_groups"):
        _number(config, m + f, low=1, integer=True)
    mults = tuple(config.model.channel_mult)
    if not mults or any(not isinstance(x, int) or x < 1 for x in mults):
        raise ConfigError(f"config.model.channel_mult={mults!r} must be positive integers.")
    _number(config, "model.dropout", low=0.0, high=1.0, high_open=True)
    _choice(config, "model.activation", tuple(ACTIVATIONS))
    _choice(config, "model.time_embedding", TIME_EMBEDDINGS)
    _choice(config, "model.downsample", DOWNSAMPLES)
    _choice(config, "model.upsample", UPSAMPLES)
    _number(config, "model.upsample_kernel", low=1, integer=True)
    _number(config, "model.upsample_padding", low=0, integer=True)
    _number(config, "model.upsample_output_padding", low=0, integer=True)
    _number(config, "model.num_classes", low=0, integer=True)
    _number(config, "model.cond_dim", low=0, integer=True)
    _choice(config, "model.dtype", tuple(DTYPES))
    for ch in (config.model.base_channels * x for x in mults):
        if ch % config.model.num_groups:
            raise ConfigError(
                f"config.model.num_groups={config.model.num_groups} must divide every level's "
                f"channels (base_channels * channel_mult), and {ch} is not a multiple."
            )
    factor = 2 ** (len(mults) - 1)
    if config.data.image_size % factor:
        raise ConfigError(
            f"config.data.image_size={config.data.image_size} must be a multiple of {factor} "
            f"(2^(len(model.channel_mult) - 1)); e.g. 32 for Fashion-MNIST (zero-padded)."
        )

    _choice(config, "diffusion.schedule", SCHEDULES)
    _number(config, "diffusion.num_timesteps", low=1, integer=True)
    _choice(config, "diffusion.prediction", PREDICTIONS)
    _choice(config, "diffusion.loss_weighting", WEIGHTINGS)
    _number(config, "diffusion.min_snr_gamma", low=0.0, low_open=True)

    _choice(config, "optim.optimizer", ("adam", "adamw"))
    _number(config, "optim.lr", low=0.0, low_open=True)
    _number(config, "optim.warmup_steps", low=0, integer=True)
    _choice(config, "optim.lr_schedule", ("constant", "cosine"))
    _number(config, "optim.weight_decay", low=0.0)
    _number(config, "optim.b1", low=0.0, high=1.0, high_open=True)
    _number(config, "optim.b2", low=0.0, high=1.0, high_open=True)
    _number(config, "optim.eps", low=0.0, low_open=True)
    _number(config, "optim.grad_clip", low=0.0)
    _number(config, "optim.ema_decay", low=0.0, high=1.0, high_open=True)

    _number(config, "train.batch_size", low=1, integer=True)
    _number(config, "train.num_steps", low=0, integer=True)
    _number(config, "train.num_devices", low=0, integer=True)
    _number(config, "train.p_uncond", low=0.0, high=1.0, high_open=True)
    for f in ("log_every", "checkpoint_every", "keep_checkpoints"):
        _number(config, "train." + f, low=1, integer=True)
    _number(config, "train.sample_every", low=0, integer=True)
    _number(config, "train.max_consecutive_skips", low=1, integer=True)
    faults = tuple(config.train.fault_nan_steps)
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in faults):
        raise ConfigError(
            f"config.train.fault_nan_steps={faults!r} must be step numbers (integers >= 0)."
        )
    if config.train.p_uncond > 0 and not (config.model.num_classes or config.model.cond_dim):
        raise ConfigError(
            "config.train.p_uncond > 0 drops the condition, but the model is unconditional; "
            "set model.num_classes (or model.cond_dim) or p_uncond=0."
        )

    _number(config, "sample.num", low=1, integer=True)
    _number(config, "sample.batch_size", low=1, integer=True)
    _number(config, "sample.seed", low=0, integer=True)
    _choice(config, "sample.sampler", tuple(SAMPLERS))
    _number(config, "sample.num_steps", low=0, high=config.diffusion.num_timesteps, integer=True)
    _choice(config, "sample.spacing", ("uniform", "quadratic"))
    _choice(config, "sample.variance", VARIANCES)
    _number(config, "sample.eta", low=0.0)
    _number(config, "sample.clip_x0", low=0.0)
    _number(config, "sample.num_strip", low=2, integer=True)

    _number(config, "sample.guidance_scale", low=0.0)
    for w in tuple(config.sample.sweep_scales):
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
            raise ConfigError(
                f"config.sample.sweep_scales={config.sample.sweep_scales!r} "
                "must be finite numbers >= 0."
            )
    _number(config, "sample.classifier_scale", low=0.0)
    guided = config.sample.classifier_scale > 0
    if guided and not config.sample.classifier_workdir:
        raise ConfigError(
            "config.sample.classifier_scale > 0 needs config.sample.classifier_workdir: the "
            "workdir of a classifier trained with configs/classifier.py."
        )
    labels = tuple(config.sample.labels)
    k = config.model.num_classes
    if labels and not (k or guided):
        raise ConfigError(
            "config.sample.labels is set but the model is unconditional (model.num_classes=0) "
            "and no classifier guides it (sample.classifier_scale=0)."
        )
    if k and any(not isinstance(y, int) or not 0 <= y < k for y in labels):
        raise ConfigError(f"config.sample.labels={labels!r} must be integers in [0, {k}).")
    if any(not isinstance(y, int) or y < 0 for y in labels):
        raise ConfigError(f"config.sample.labels={labels!r} must be integers >= 0.")
    conditional = k or config.model.cond_dim
    if config.sample.guidance_scale > 0 and not (conditional and config.train.p_uncond > 0):
        raise ConfigError(
            "config.sample.guidance_scale > 0 needs a conditional model trained with condition "
            "dropout (model.num_classes or model.cond_dim > 0, and train.p_uncond > 0)."
        )
    if config.model.cond_dim:
        prompts = tuple(config.sample.get("prompts", ()))
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ConfigError(
                "A text-conditional model (model.cond_dim > 0) samples from "
                "config.sample.prompts: give a list of non-empty strings."
            )
        if config.train.sample_every:
            raise ConfigError(
                "config.train.sample_every must be 0 for a text-conditional model; draw its "
                "prompt grid with --mode=sample."
            )
        names = tuple(config.text.get("class_names", ()))
        if not names or not all(isinstance(n, str) and n.strip() for n in names):
            raise ConfigError(
                "config.text.class_names must list the dataset's class names (non-empty "
                "strings, in label order): --mode=eval draws and scores one prompt per class."
            )
        template = config.text.get("template", "")
        if not isinstance(template, str) or template.count("{}") != 1:
            raise ConfigError(
                f"config.text.template={template!r} must contain '{{}}' once, where the class "
                "name goes (e.g. 'a photo of a {}')."
            )
        if config.eval.get("every_steps", 0):
            raise ConfigError(
                "config.eval.every_steps must be 0 for a text-conditional model; evaluate "
                "its checkpoints with --mode=eval."
            )

    _number(config, "eval.num_examples", low=1, integer=True)
    _number(config, "eval.batch_size", low=1, integer=True)
    e = config.eval
    if "num_samples" in e:  # the diffusion task's sample metrics
        _number(config, "eval.num_samples", low=2, integer=True)
        _number(config, "eval.num_reference", low=2, integer=True)
        _number(config, "eval.kid_subset_size", low=2, integer=True)
        _number(config, "eval.kid_num_subsets", low=1, integer=True)
        _number(config, "eval.pr_k", low=1, integer=True)
        _number(config, "eval.bpd_num_examples", low=0, integer=True)
        _number(config, "eval.bpd_num_terms", low=0, integer=True)
        if e.bpd_num_terms == 1:
            raise ConfigError(
                "config.eval.bpd_num_terms=1 cannot estimate the bound; use 0 (all T) or >= 2."
            )
        _number(config, "eval.every_steps", low=0, integer=True)
        _number(config, "eval.checkpoint_step", low=0, integer=True)
        if e.every_steps and not e.judge_workdir:
            raise ConfigError(
                "config.eval.every_steps > 0 computes sample metrics, which need "
                "config.eval.judge_workdir (a clean classifier, configs/classifier.py:clean)."
            )
        if e.num_samples <= e.pr_k or e.num_reference <= e.pr_k:
            raise ConfigError(
                f"config.eval.num_samples and num_reference must exceed eval.pr_k={e.pr_k}."
            )
    if task == "classifier":
        _validate_classifier(config)
    if task == "clip":
        for f in (
            "vocab_size",
            "context_length",
            "text_width",
            "text_layers",
            "vision_width",
            "vision_layers",
            "heads",
            "patch_size",
            "projection_dim",
        ):
            _number(config, "clip." + f, low=1, integer=True)
        k = config.clip
        for f in ("text_width", "vision_width"):
            if k[f] % k.heads:
                raise ConfigError(f"config.clip.heads={k.heads} must divide clip.{f}={k[f]}.")
        if config.data.image_size % k.patch_size:
            raise ConfigError(
                f"config.clip.patch_size={k.patch_size} must divide data.image_size="
                f"{config.data.image_size}."
            )


def _validate_classifier(config) -> None:
    from diffax_lab.classifier import NOISES

    if "classifier" not in config:
        raise ConfigError("config.task='classifier' needs a config.classifier section.")
    _choice(config, "classifier.noise", NOISES)
    if config.train.sample_every:
        raise ConfigError("A classifier draws nothing: set config.train.sample_every=0.")
    _number(config, "model.num_classes", low=2, integer=True)
    if config.model.cond_dim or config.train.p_uncond:
        raise ConfigError(
            "A classifier takes no condition: set model.cond_dim=0 and train.p_uncond=0."
        )
    for t in tuple(config.eval.get("times", (0.0,))):
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 <= t <= 1:
            raise ConfigError(f"config.eval.times={tuple(config.eval.times)!r} must lie in [0, 1].")
