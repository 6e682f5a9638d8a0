"""What every denoising-diffusion task shares: the U-Net and its schedule and loss, the
network as the samplers see it (conditioning, classifier-free and classifier guidance),
batched generation, the sample grid and the noising strips of ``--mode=sample``, and the
checks of the ``model``, ``diffusion`` and ``sample`` sections.

Not a task itself: ``tasks/diffusion.py`` (pixel models, unconditional or class-conditional)
and ``tasks/text2img.py`` (conditioned on CLIP embeddings) build on it. A subclass says how a
condition enters the network through ``condition_kwargs`` and which conditions a sample
batch gets through ``sample_conditions``.
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from diffax_lab import compilation, images
from diffax_lab import workdir as workdir_lib
from diffax_lab.config_lib import (
    DEFAULT_CONFIG,
    apply_overrides,
    check_choice,
    check_number,
    get_field,
    load_config,
)
from diffax_lab.data import load_split, pipeline
from diffax_lab.diffusion import get_loss_fn, get_schedule, guidance, process, samplers
from diffax_lab.diffusion.losses import WEIGHTINGS
from diffax_lab.diffusion.process import PREDICTIONS
from diffax_lab.diffusion.samplers import SAMPLERS, VARIANCES
from diffax_lab.diffusion.schedules import SCHEDULES, discrete_betas
from diffax_lab.diffusion.sde_samplers import CORRECTORS, PREDICTORS, SOLVERS
from diffax_lab.errors import ConfigError
from diffax_lab.models import DTYPES, get_model
from diffax_lab.models.diffusers_unet import (
    DiffusersFormatError,
    describe_unet2d,
    lab_config_fields,
    load_unet2d,
)
from diffax_lab.models.layers import ACTIVATIONS, DOWNSAMPLES, NORMS, UPSAMPLES
from diffax_lab.models.unet import TIME_EMBEDDINGS
from diffax_lab.tasks import registry
from diffax_lab.tasks.base import Task


def check_unet_section(config) -> None:
    """The U-Net fields of the ``model`` section (also the classifier's encoder)."""
    for f in ("base_channels", "num_res_blocks", "attention_heads", "num_groups"):
        check_number(config, "model." + f, low=1, integer=True)
    mults = tuple(config.model.channel_mult)
    if not mults or any(not isinstance(x, int) or x < 1 for x in mults):
        raise ConfigError(f"config.model.channel_mult={mults!r} must be positive integers.")
    check_number(config, "model.dropout", low=0.0, high=1.0, high_open=True)
    check_choice(config, "model.activation", tuple(ACTIVATIONS))
    check_choice(config, "model.time_embedding", TIME_EMBEDDINGS)
    if "time_index_offset" in config.model:
        check_number(config, "model.time_index_offset", low=0.0)
    check_choice(config, "model.downsample", DOWNSAMPLES)
    check_choice(config, "model.upsample", UPSAMPLES)
    check_number(config, "model.upsample_kernel", low=1, integer=True)
    check_number(config, "model.upsample_padding", low=0, integer=True)
    check_number(config, "model.upsample_output_padding", low=0, integer=True)
    check_number(config, "model.num_classes", low=0, integer=True)
    check_number(config, "model.cond_dim", low=0, integer=True)
    check_choice(config, "model.dtype", tuple(DTYPES))
    if "norm" in config.model:
        check_choice(config, "model.norm", NORMS)
    if "residual" in config.model:
        check_choice(config, "model.residual", (True, False))
    check_unet_diffusers_fields(config)
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


def check_unet_diffusers_fields(config) -> None:
    """The model fields of diffusers' UNet2DModel options (configs/ddpm.py), where present."""
    m = config.model
    if "time_scale" in m:
        check_number(config, "model.time_scale", low=0.0, low_open=True)
        check_number(config, "model.time_freq_shift", low=0.0)
        check_number(config, "model.norm_eps", low=0.0, low_open=True)
        check_choice(config, "model.downsample_padding", (0, 1))
        check_number(config, "model.attention_head_dim", low=0, integer=True)
        levels = tuple(m.attention_levels)
        if any(not isinstance(v, int) or not 0 <= v < len(m.channel_mult) for v in levels):
            raise ConfigError(
                f"config.model.attention_levels={levels!r} must be level indices in "
                f"[0, {len(m.channel_mult)}) (0 = full size)."
            )
        if m.outer_activation:
            check_choice(config, "model.outer_activation", tuple(ACTIVATIONS))


# Fields a diffusers folder sets that stay the user's when set to another value: training
# and sampling settings, not the network's shape.
USER_WINS = ("model.dropout", "sample.clip_x0", "sample.variance")


def _canonical(value):
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


def take_model_from_diffusers(config) -> None:
    """init.from_diffusers=DIR: the model section (and data.channels, data.image_size, the
    diffusion section) from DIR's config files. A field still at configs/ddpm.py's default
    takes DIR's value; a field set to a third value is refused by name (training and
    sampling settings in ``USER_WINS`` keep the user's). No weight is read here."""
    field = "config.init.from_diffusers"
    path = config.init.from_diffusers
    if not os.path.isdir(path):
        raise ConfigError(
            f"{field}={path!r} is not a folder. Give a diffusers UNet2DModel folder "
            "(config.json + diffusion_pytorch_model.safetensors) or a pipeline folder holding "
            "unet/, e.g. from `huggingface-cli download google/ddpm-cifar10-32 --local-dir DIR`; "
            f"to sample or evaluate a finished run without it, set {field}=''."
        )
    try:
        info = describe_unet2d(path, num_train_timesteps=_folder_T(config, path))
        wanted = lab_config_fields(info)
    except DiffusersFormatError as e:
        raise ConfigError(f"{field}={path!r}: {e}") from None
    defaults = load_config(DEFAULT_CONFIG)
    for dotted, want in wanted.items():
        have = get_field(config, dotted)
        if _canonical(have) == _canonical(want):
            continue
        at_default = _canonical(have) == _canonical(get_field(defaults, dotted))
        if dotted in USER_WINS and not at_default:
            continue
        if not at_default:
            raise ConfigError(
                f"config.{dotted}={have!r} differs from {want!r}, which {field}={path!r} "
                f"gives (its config files). Drop that setting (the folder sets it) or use "
                "another folder."
            )
        value = float(want) if isinstance(have, float) and isinstance(want, int) else want
        apply_overrides(config, {dotted: value})


def _folder_T(config, path) -> int | None:
    """T for a folder without scheduler_config.json: the config's diffusion.num_timesteps."""
    info = describe_unet2d(path)
    return None if info.scheduler_file else config.diffusion.num_timesteps


def check_diffusion_section(config) -> None:
    check_choice(config, "diffusion.schedule", SCHEDULES)
    check_number(config, "diffusion.num_timesteps", low=1, integer=True)
    try:  # a schedule that cannot exist (linear with too few steps) is refused here
        discrete_betas(config.diffusion.schedule, config.diffusion.num_timesteps)
    except ValueError as e:
        raise ConfigError(f"config.{e}") from None
    check_choice(config, "diffusion.prediction", PREDICTIONS)
    check_choice(config, "diffusion.loss_weighting", WEIGHTINGS)
    check_number(config, "diffusion.min_snr_gamma", low=0.0, low_open=True)


def check_sampler_fields(config) -> None:
    check_number(config, "sample.num", low=1, integer=True)
    check_number(config, "sample.batch_size", low=1, integer=True)
    check_number(config, "sample.seed", low=0, integer=True)
    check_choice(config, "sample.sampler", tuple(SAMPLERS))
    check_number(
        config, "sample.num_steps", low=0, high=config.diffusion.num_timesteps, integer=True
    )
    check_choice(config, "sample.spacing", ("uniform", "quadratic"))
    check_choice(config, "sample.variance", VARIANCES)
    check_number(config, "sample.eta", low=0.0)
    if "solver" in config.sample:  # the SDE samplers' options (diffusion/sde_samplers.py)
        check_choice(config, "sample.predictor", tuple(PREDICTORS))
        check_choice(config, "sample.corrector", tuple(CORRECTORS))
        check_number(config, "sample.snr", low=0.0, low_open=True)
        check_number(config, "sample.corrector_steps", low=0, integer=True)
        check_choice(config, "sample.solver", tuple(SOLVERS))
        check_number(config, "sample.rtol", low=0.0, low_open=True)
        check_number(config, "sample.atol", low=0.0, low_open=True)
    if samplers.SAMPLER_GRIDS[config.sample.sampler] == "adaptive" and config.sample.num_steps:
        raise ConfigError(
            f"config.sample.sampler={config.sample.sampler!r} chooses its own steps: set "
            "sample.num_steps=0 and its tolerances sample.rtol / sample.atol instead."
        )
    check_number(config, "sample.clip_x0", low=0.0)
    check_number(config, "sample.num_strip", low=2, integer=True)
    check_number(config, "sample.guidance_scale", low=0.0)
    for w in tuple(config.sample.sweep_scales):
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
            raise ConfigError(
                f"config.sample.sweep_scales={config.sample.sweep_scales!r} "
                "must be finite numbers >= 0."
            )
    check_number(config, "sample.classifier_scale", low=0.0)
    if config.sample.classifier_scale > 0 and not config.sample.classifier_workdir:
        raise ConfigError(
            "config.sample.classifier_scale > 0 needs config.sample.classifier_workdir: the "
            "workdir of a classifier trained with configs/classifier.py."
        )


def check_sample_metric_fields(config) -> None:
    """The eval fields of the sample metrics (FD, KID, precision/recall, bits/dim)."""
    e = config.eval
    check_number(config, "eval.num_samples", low=2, integer=True)
    check_number(config, "eval.num_reference", low=2, integer=True)
    check_number(config, "eval.kid_subset_size", low=2, integer=True)
    check_number(config, "eval.kid_num_subsets", low=1, integer=True)
    check_number(config, "eval.pr_k", low=1, integer=True)
    check_number(config, "eval.bpd_num_examples", low=0, integer=True)
    check_number(config, "eval.bpd_num_terms", low=0, integer=True)
    if e.bpd_num_terms == 1:
        raise ConfigError(
            "config.eval.bpd_num_terms=1 cannot estimate the bound; use 0 (all T) or >= 2."
        )
    check_number(config, "eval.every_steps", low=0, integer=True)
    if "inception_batch_size" in e:
        check_number(config, "eval.inception_batch_size", low=1, integer=True)
    if e.every_steps and not e.judge_workdir:
        raise ConfigError(
            "config.eval.every_steps > 0 computes sample metrics, which need "
            "config.eval.judge_workdir (a clean classifier, configs/classifier.py:clean)."
        )
    if e.num_samples <= e.pr_k or e.num_reference <= e.pr_k:
        raise ConfigError(
            f"config.eval.num_samples and num_reference must exceed eval.pr_k={e.pr_k}."
        )
    metrics = tuple(e.get("metrics", ()))
    if any(m in metrics for m in ("fd", "kid", "pr")) and not e.judge_workdir:
        raise ConfigError(
            f"config.eval.metrics={metrics!r} asks for sample metrics, which need "
            "config.eval.judge_workdir (a clean classifier, configs/classifier.py:clean)."
        )
    if "bpd" in metrics and not e.bpd_num_examples:
        raise ConfigError(
            "config.eval.metrics asks for 'bpd': set config.eval.bpd_num_examples > 0."
        )


def check_label_fields(config) -> None:
    """Class labels (model.num_classes), their dropout for classifier-free guidance and the
    labels a sample asks for; a vector-conditional model (model.cond_dim) also drops."""
    k = config.model.num_classes
    conditional = k or config.model.cond_dim
    if config.train.p_uncond > 0 and not conditional:
        raise ConfigError(
            "config.train.p_uncond > 0 drops the condition, but the model is unconditional; "
            "set model.num_classes (or model.cond_dim) or p_uncond=0."
        )
    guided = config.sample.classifier_scale > 0
    labels = tuple(config.sample.labels)
    if labels and not (k or guided):
        raise ConfigError(
            "config.sample.labels is set but the model is unconditional (model.num_classes=0) "
            "and no classifier guides it (sample.classifier_scale=0)."
        )
    if k and any(not isinstance(y, int) or not 0 <= y < k for y in labels):
        raise ConfigError(f"config.sample.labels={labels!r} must be integers in [0, {k}).")
    if any(not isinstance(y, int) or y < 0 for y in labels):
        raise ConfigError(f"config.sample.labels={labels!r} must be integers >= 0.")
    if config.sample.guidance_scale > 0 and not (conditional and config.train.p_uncond > 0):
        raise ConfigError(
            "config.sample.guidance_scale > 0 needs a conditional model trained with condition "
            "dropout (model.num_classes or model.cond_dim > 0, and train.p_uncond > 0)."
        )


class DenoisingTask(Task):
    """A U-Net trained to denoise x_t under one schedule; samples with every sampler."""

    can_sample = True
    metrics = ("loss", "fd", "kid", "pr", "bpd", "fid_inception", "kid_inception")

    @classmethod
    def check_config(cls, config) -> None:
        super().check_config(config)
        if config.get("init", {}).get("from_diffusers", ""):
            take_model_from_diffusers(config)
        check_unet_section(config)
        check_diffusion_section(config)
        check_sampler_fields(config)
        check_sample_metric_fields(config)
        check_number(config, "train.p_uncond", low=0.0, high=1.0, high_open=True)
        check_label_fields(config)

    def build(self):
        c = self.config
        self.schedule = get_schedule(c.diffusion.schedule, c.diffusion.num_timesteps)
        self.model = get_model(c)
        self.loss_fn = get_loss_fn(
            self.schedule,
            c.diffusion.prediction,
            c.diffusion.loss_weighting,
            c.diffusion.min_snr_gamma,
        )
        self.classifier = None  # (classifier task, params) for classifier guidance

    def default_metrics(self):
        e = self.config.eval
        judge = ("fd", "kid", "pr") if e.judge_workdir else ()
        return ("loss", *judge, *(("bpd",) if e.bpd_num_examples else ()))

    # ----- how a condition enters the network: class labels (model.num_classes) here;
    # a task conditioned on something else overrides these four -----
    @property
    def uses_condition(self) -> bool:
        """Whether the network takes the per-example condition (labels of the data)."""
        return bool(self.config.model.num_classes)

    def condition_kwargs(self, cond, train: bool = False, key=None) -> dict:
        """Keyword arguments of the U-Net for the per-example condition ``cond``; at training
        time with ``key`` the label is dropped to the null label at rate p_uncond."""
        k = self.config.model.num_classes
        if not k:
            return {}  # labels reach only a guiding classifier
        p = self.config.train.p_uncond
        if train and p > 0:  # classifier-free guidance: drop to the null label
            cond = jnp.where(jax.random.bernoulli(key, p, cond.shape), k, cond)
        return {"y": cond}

    def uncond_kwargs(self, cond) -> dict | None:
        """The null condition of classifier-free guidance, or None when there is no CFG."""
        k = self.config.model.num_classes
        if not k or self.config.train.p_uncond == 0:
            return None
        return {"y": jnp.full_like(cond, k)}

    def sample_conditions(self, num: int, labels=None):
        """The conditions of ``num`` samples: the labels asked (sample.labels, else every
        class in turn), or None for unlabelled sampling."""
        if not self.num_labels:
            return None
        labels = labels if labels is not None else tuple(self.config.sample.labels)
        labels = tuple(np.asarray(labels).tolist()) or tuple(range(self.num_labels))
        return np.asarray(labels, np.int32)

    # ----- the network -----
    def init_params(self, key):
        c = self.config.model
        x = jnp.zeros((1, *self.image_shape))
        y = jnp.zeros((1,), jnp.int32) if c.num_classes else None
        cond = jnp.zeros((1, c.cond_dim)) if c.cond_dim else None
        return self.model.init(key, x, jnp.zeros((1,)), y=y, cond=cond)["params"]

    def model_fn(self, params, cond=None, *, train=False, rngs=None, key=None):
        """(x_t, t) -> network output, for the per-example condition ``cond``."""
        kwargs = self.condition_kwargs(cond, train, key) if cond is not None else {}

        def fn(x_t, t):
            return self.model.apply({"params": params}, x_t, t, train=train, rngs=rngs, **kwargs)

        return fn

    def train_loss(self, params, x0, labels, keys):
        drop_key, loss_key, dropout_key = keys
        cond = labels if self.uses_condition else None
        fn = self.model_fn(params, cond, train=True, rngs={"dropout": dropout_key}, key=drop_key)
        return self.loss_fn(fn, x0, loss_key)

    def eval_loss(self, params, x_u8, cond, key):
        """(loss, aux) of a test batch, conditioned as in training but never dropped."""
        fn = self.model_fn(params, cond if self.uses_condition else None)
        return self.loss_fn(fn, pipeline.to_model_range(x_u8), key)

    # ----- sampling -----
    def attach_classifier(self, classifier_task, classifier_params) -> None:
        """Enables classifier guidance (sample.classifier_scale) with a trained classifier."""
        self.classifier = (classifier_task, classifier_params)

    @property
    def num_labels(self) -> int:
        """Classes a sample can be asked for: the model's, else the guiding classifier's."""
        if self.config.model.num_classes:
            return self.config.model.num_classes
        return self.classifier[0].config.model.num_classes if self.classifier else 0

    def load_resources(self, workdir: str, mode: str) -> None:
        if mode != "train" and self.config.sample.classifier_scale > 0:
            self.load_guidance_classifier(self.mesh)
        path = self.config.get("init", {}).get("from_diffusers", "")
        if mode == "train" and path and not workdir_lib.has_checkpoints(workdir):
            self.load_pretrained(path)

    def load_pretrained(self, path: str) -> None:
        """Reads init.from_diffusers's weights (checked against the model's shapes); the
        next ``create_state`` starts from them (params and EMA)."""
        field = "config.init.from_diffusers"
        try:
            _, variables, info = load_unet2d(path, num_train_timesteps=self.schedule.num_steps)
        except DiffusersFormatError as e:
            raise ConfigError(f"{field}={path!r}: {e}") from None
        params = jax.device_get(variables["params"])
        want = jax.tree.map(lambda a: (a.shape, str(a.dtype)), self.abstract_state["params"])
        have = jax.tree.map(lambda a: (a.shape, str(a.dtype)), params)
        if want != have:
            raise ConfigError(
                f"{field}={path!r}: its weights do not fit the model the config builds "
                "(parameter names or shapes differ); the model section must be the folder's."
            )
        logging.info(
            "Starting from %s (%.2fM parameters%s).",
            info.weights_file,
            sum(np.size(x) for x in jax.tree.leaves(params)) / 1e6,
            ", legacy attention names" if info.legacy_attention_names else "",
        )
        self.pretrained_params = params

    def create_state(self, *args, **kwargs):
        state = super().create_state(*args, **kwargs)
        pretrained = getattr(self, "pretrained_params", None)
        if pretrained is None:
            return state
        return {
            **state,
            "params": jax.device_put(pretrained, self.state_shardings["params"]),
            "ema_params": jax.device_put(pretrained, self.state_shardings["ema_params"]),
        }

    def load_guidance_classifier(self, mesh) -> None:
        """Loads and checks sample.classifier_workdir's classifier for classifier guidance."""
        field = "config.sample.classifier_workdir"
        workdir = self.config.sample.classifier_workdir
        run, params = registry.restore_run(workdir, mesh, field)
        if not hasattr(run, "log_prob_fn"):
            raise ConfigError(
                f"{field}={workdir!r} is a {run.name!r} run, not a classifier "
                "(configs/classifier.py)."
            )
        self.check_guidance_classifier(run)
        if run.config.classifier.noise == "none":
            logging.warning(
                "%s is a clean classifier (t = 0): its gradients on noisy x_t guide poorly; "
                "train one with classifier.noise='diffusion' for guidance.",
                workdir,
            )
        self.attach_classifier(run, params)

    def check_guidance_classifier(self, classifier_task) -> None:
        """The classifier must see what the diffusion model produces: same images, noise."""
        c, k = self.config, classifier_task.config
        where = f"config.sample.classifier_workdir (a classifier for {k.data.name})"
        if (k.data.image_size, k.data.channels) != (c.data.image_size, c.data.channels):
            raise ConfigError(
                f"{where} takes {k.data.image_size}x{k.data.image_size}x{k.data.channels} "
                f"images, the model makes {c.data.image_size}x{c.data.image_size}x"
                f"{c.data.channels}."
            )
        if (k.diffusion.schedule, k.diffusion.num_timesteps) != (
            c.diffusion.schedule,
            c.diffusion.num_timesteps,
        ):
            raise ConfigError(
                f"{where} was trained on x_t of the {k.diffusion.schedule} schedule with "
                f"T={k.diffusion.num_timesteps}; the model uses {c.diffusion.schedule}, "
                f"T={c.diffusion.num_timesteps}. Train the classifier with the same diffusion "
                "section."
            )
        if c.model.num_classes and k.model.num_classes != c.model.num_classes:
            raise ConfigError(
                f"{where} has {k.model.num_classes} classes, the model {c.model.num_classes}."
            )

    def guided_model_fn(
        self, params, cond, guidance_scale, classifier_params=None, classifier_scale=0.0
    ):
        """The network as the sampler sees it: plain, conditional, CFG with weight w, and
        classifier guidance with scale s on top when ``classifier_params`` are given.

        CFG runs whenever the model was trained with condition dropout (p_uncond > 0);
        w = 0 is then plain conditional sampling (the unconditional half is multiplied by 0).
        """
        null = self.uncond_kwargs(cond) if cond is not None else None
        if null is None:
            fn = self.model_fn(params, cond)
        else:

            def apply(x, t, **kw):
                return self.model.apply({"params": params}, x, t, **kw)

            fn = guidance.classifier_free(apply, self.condition_kwargs(cond), null, guidance_scale)
        if classifier_params is None:
            return fn
        return guidance.classifier_guided(
            fn,
            self.classifier[0].log_prob_fn(classifier_params),
            cond,
            self.schedule,
            classifier_scale,
            self.config.diffusion.prediction,
        )

    def sampler_kwargs(self):
        """The sample section's fields named like the sampler's own options."""
        s = self.config.sample
        return {n: s[n] for n in samplers.sampler_options(s.sampler) if n in s}

    @property
    def adaptive_sampler(self) -> bool:
        """The sampler chooses its own steps (no trajectory, no step count)."""
        return samplers.SAMPLER_GRIDS[self.config.sample.sampler] == "adaptive"

    @property
    def sample_steps(self):
        """The steps of the sampler, as names and reports give them."""
        if self.adaptive_sampler:
            return "adaptive"
        return self.config.sample.num_steps or self.schedule.num_steps

    @functools.cached_property
    def sample_batch(self):
        """The jitted sampler for one batch of sample.batch_size:
        (params, key, cond, guidance_scale, x_T, classifier_params, classifier_scale,
        num_trajectory=static) -> SampleOutput."""
        s = self.config.sample

        def run(
            params, key, cond, guidance_scale, x_T, classifier_params, classifier_scale, num_traj
        ):
            return samplers.sample(
                self.guided_model_fn(
                    params, cond, guidance_scale, classifier_params, classifier_scale
                ),
                self.schedule,
                (s.batch_size, *self.image_shape),
                key,
                sampler=s.sampler,
                num_steps=s.num_steps or None,
                spacing=s.spacing,
                prediction=self.config.diffusion.prediction,
                clip_x0=s.clip_x0 or None,
                num_trajectory=num_traj,
                x_T=x_T,
                **self.sampler_kwargs(),
            )

        return compilation.Reusing(
            run, devices=self.mesh.devices.flat, static_argnames=("num_traj",)
        )

    def generate(
        self,
        params,
        num: int,
        key,
        labels=None,
        num_trajectory: int = 0,
        guidance_scale: float | None = None,
        same_noise: bool = False,
        classifier_scale: float | None = None,
    ):
        """``num`` images as float [-1, 1] (numpy), in batches of sample.batch_size.

        ``labels`` (class labels, or condition vectors for vector-conditional models) are
        cycled over the samples; they default to ``sample_conditions``. ``guidance_scale``
        (CFG w) and ``classifier_scale`` (s, needs ``attach_classifier``) default to the
        config's. ``same_noise`` starts every batch from the same x_T (for sweeps). Returns
        (images, trajectory, trajectory_times); the trajectory is of the first batch only.
        """
        c = self.config
        bs = c.sample.batch_size
        w = c.sample.guidance_scale if guidance_scale is None else guidance_scale
        s = c.sample.classifier_scale if classifier_scale is None else classifier_scale
        classifier_params = None
        if s > 0:
            if self.classifier is None:
                raise ValueError("classifier_scale > 0 needs attach_classifier() first.")
            classifier_params = self.classifier[1]
        conds = self.sample_conditions(num, labels)
        x_T = None
        if same_noise:
            x_T = jax.random.normal(jax.random.fold_in(key, 2**31 - 1), (bs, *self.image_shape))
        outs, traj, times = [], None, None
        for b in range(-(-num // bs)):
            batch_key = key if same_noise else jax.random.fold_in(key, b)
            cond = None
            if conds is not None:
                ids = np.arange(b * bs, (b + 1) * bs) % len(conds)
                cond = jnp.asarray(np.asarray(conds)[ids])
            out = self.sample_batch(
                params,
                batch_key,
                cond,
                jnp.float32(w),
                x_T,
                classifier_params,
                jnp.float32(s),
                num_traj=num_trajectory if b == 0 else 0,
            )
            outs.append(jax.device_get(out.samples))
            if b == 0 and num_trajectory:
                traj, times = jax.device_get(out.trajectory), out.trajectory_times
        return np.concatenate(outs)[:num], traj, times

    def requested_labels(self, n: int):
        """The class asked of each of ``generate``'s first n samples (None if unlabelled)."""
        if not self.num_labels:
            return None
        labels = tuple(self.config.sample.labels) or tuple(range(self.num_labels))
        return np.asarray(labels)[np.arange(n) % len(labels)]

    def sampling_info(self) -> dict:
        """How evaluated samples are drawn."""
        s = self.config.sample
        return {
            "sampler": s.sampler,
            "sample_steps": self.sample_steps,
            "guidance_scale": s.guidance_scale,
            "classifier_scale": s.classifier_scale,
        }

    def eval_samples(self, params, num: int, key):
        """(uint8 samples, the class asked of each or None, info) for the sample metrics."""
        samples, _, _ = self.generate(params, num, key)
        u8 = np.asarray(pipeline.to_uint8(samples))
        return u8, self.requested_labels(num), self.sampling_info()

    def sample_tag(self) -> str:
        s = self.config.sample
        return (
            f"{s.sampler}{self.sample_steps}_w{s.guidance_scale:g}"
            f"_s{s.classifier_scale:g}_n{self.config.eval.num_samples}"
        )

    # ----- outputs -----
    def write_samples(self, params, workdir: str, step: int, key) -> str:
        num = self.config.sample.num
        samples, _, _ = self.generate(params, num, key)
        path = os.path.join(workdir, "samples", f"step_{step:06d}.png")
        images.save_grid(path, np.asarray(pipeline.to_uint8(samples)))
        logging.info("Wrote %d samples (EMA) to %s.", num, path)
        return path

    def forward_strip(self, image_uint8: np.ndarray, num: int, key) -> tuple:
        """One image noised to num evenly spaced times t (t = 0 first), as uint8 frames."""
        T = self.schedule.num_steps
        steps = np.round(np.linspace(0, T - 1, num - 1)).astype(np.int32)
        x0 = pipeline.to_model_range(np.broadcast_to(image_uint8, (num - 1, *image_uint8.shape)))
        noise = jax.random.normal(key, x0.shape)
        xt = process.q_sample(x0, self.schedule.alphas_cumprod[steps], noise)
        frames = np.concatenate([image_uint8[None], np.asarray(pipeline.to_uint8(xt))])
        times = np.concatenate([[0.0], np.asarray(self.schedule.times)[steps]])
        return frames, times

    def write_guidance_sweep(self, params, out_dir: str, key) -> str:
        """Rows: guidance strengths (sample.sweep_scales); columns: classes; the same x_T in
        every row. CFG weights w for a model trained with label dropout, else classifier
        scales s (classifier guidance)."""
        c = self.config
        classes = tuple(c.sample.labels) or tuple(range(self.num_labels))
        scales = tuple(c.sample.sweep_scales)
        cfg = c.model.num_classes and c.train.p_uncond > 0
        if not cfg and self.classifier is None:
            scales = (0.0,)  # a conditional model without CFG: one row
        rows, names = [], []
        for v in scales:
            kw = {"guidance_scale": v} if cfg else {"classifier_scale": v}
            imgs, _, _ = self.generate(
                params, len(classes), key, labels=classes, same_noise=True, **kw
            )
            rows.append(np.asarray(pipeline.to_uint8(imgs)))
            names.append(f"{'w' if cfg else 's'}={v:g}")
        path = os.path.join(out_dir, "guidance_sweep.png")
        images.save_labelled_rows(path, rows, names)
        logging.info(
            "Wrote the guidance sweep (rows %s, columns classes %s) to %s.", names, classes, path
        )
        return path

    def sample_stem(self, step: int) -> str:
        s = self.config.sample
        stem = f"sample_step_{step:06d}_{s.sampler}_{self.sample_steps}"
        if self.config.model.num_classes and self.config.train.p_uncond > 0:
            stem += f"_w{s.guidance_scale:g}"
        if self.classifier:
            stem += f"_s{s.classifier_scale:g}"
        return stem

    def sample(self, params, workdir: str, step: int, key, labels=None) -> dict:
        """The grid and .npz of sample.num images, the forward and reverse strips, and the
        guidance sweep of a labelled model."""
        s = self.config.sample
        out_dir = os.path.join(workdir, "samples")
        logging.info(
            "Sampling %d images with %s (%s steps) from step %d%s...",
            s.num,
            s.sampler,
            self.sample_steps,
            step,
            f", classifier guidance s={s.classifier_scale:g}" if self.classifier else "",
        )
        samples, traj, traj_times = self.generate(
            params,
            s.num,
            key,
            labels=labels,
            num_trajectory=0 if self.adaptive_sampler else s.num_strip,
        )
        samples_u8 = np.asarray(pipeline.to_uint8(samples))
        stem = self.sample_stem(step)
        images.save_grid(os.path.join(out_dir, stem + ".png"), samples_u8)
        if jax.process_index() == 0:
            np.savez_compressed(os.path.join(out_dir, stem + ".npz"), images=samples_u8)
        rev_t = []
        if traj is not None:  # x_t fed to the network along the first trajectory, then x_0
            rev = np.concatenate([np.asarray(pipeline.to_uint8(traj[:, 0])), samples_u8[:1]])
            rev_t = [*traj_times, 0.0]
            images.save_labelled_rows(
                os.path.join(out_dir, "reverse_strip.png"), [rev], ["p(x_t-1|x_t)"]
            )
        # Forward strip: a real test image noised to increasing t (falls back to a sample).
        try:
            real = load_split(self.config.data, "test")[0][0]
        except ValueError:  # DataError: no test split
            real = samples_u8[0]
        fwd, fwd_t = self.forward_strip(real, s.num_strip + 1, jax.random.fold_in(key, 1))
        images.save_labelled_rows(os.path.join(out_dir, "forward_strip.png"), [fwd], ["q(x_t|x_0)"])
        if self.num_labels:
            self.write_guidance_sweep(params, out_dir, jax.random.fold_in(key, 2))
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
            "samples": samples_u8,
        }
