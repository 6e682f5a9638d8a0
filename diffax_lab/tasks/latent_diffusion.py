"""Latent diffusion (``config.task = "latent_diffusion"``; configs/ldm.py; Rombach et al. 2022):
the U-Net of the diffusion task trained on the latents of a frozen KL autoencoder,
unconditional or class-conditional with classifier-free guidance as in tasks/diffusion.py.

The autoencoder, ``config.latent.autoencoder``: the workdir of a lab ``autoencoder`` run (its
EMA weights) or a diffusers AutoencoderKL folder (``config.json`` +
``diffusion_pytorch_model.safetensors``, or a pipeline folder with one under ``vae/``). Its
architecture is read in ``build`` (the latent shape [H/f, W/f, latent_channels] is the shape
the U-Net and the samplers see: ``self.image_shape``); its weights in ``load_resources``.

Latents: the U-Net sees z * scale, z ~ q(z | x) drawn afresh at every step (LDM's
``get_first_stage_encoding``), scale = ``latent.scale_factor``, or with 0 LDM's estimate
1 / std(z) over one posterior draw of every training image. The value a run trains with is
recorded in ``DIR/latent_scale.json`` (with a digest of the autoencoder's weights), so a
resumed run, ``--mode=sample`` and ``--mode=eval`` use the same one and refuse another
autoencoder.

Why the training set is encoded once and cached (``DIR/latents_train_<digest>.npz``: the
posterior mean and standard deviation of every image, keyed by the images and the
autoencoder's weights): the encoder is frozen, so q(z | x) of an image never changes.
Encoding inside the step would run the encoder's forward pass on every batch, S steps x B
images, which is S B / N passes over the N training images (hundreds in a normal run, and the
encoder is as large as the decoder), for the same result each time; with the cache each image
is encoded once, and a step only draws z = mean + std * eps (elementwise) before the U-Net.
Measured with configs/ldm.py:cpu on a 2-core CPU: encoding costs 3 ms an image, so 0.2 s a
batch of 64, more than the U-Net's whole step (0.14 s); the cache costs 3 minutes once.

Sampling runs the samplers of ``tasks/denoising.py`` in latent space (every sampler, CFG) and
decodes z / scale before anything is written or judged: the grid and .npz, the strips (the
reverse strip decodes each x_t; the forward strip encodes a test image, noises its latent
and decodes), the guidance sweep, and ``eval_samples`` (uint8 images for fd/kid/pr). The
``loss`` evaluator's test loss is the diffusion loss on latents of the test images.

Text conditioning (``text.conditioning = "tokens"``, configs/ldm_text2img.py): as in
tasks/text2img.py, the U-Net cross-attends to the CLIP text encoder's token sequence of each
training image's caption (a template of data/captions.py with its class), the empty prompt
being CFG's null condition (shared code: diffax_lab/models/text_context.py). Samples and
evaluation ask for the class prompts ``text.template`` (condition i = class i's prompt).

Not supported (refused in ``check_config``): ``bpd`` (a bound on latents is not a likelihood
of images), classifier guidance (it needs a classifier of noisy latents),
``data.random_flip`` (the step would flip latents, not images) and ``sample.clip_x0``
(scaled latents have unit variance and are not bounded by 1; LDM samples without clipping).
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from diffax_lab import workdir as workdir_lib
from diffax_lab.config_lib import check_number, load_run_config
from diffax_lab.data import pipeline
from diffax_lab.data.captions import TEMPLATES, class_captions
from diffax_lab.diffusion import latent, process
from diffax_lab.errors import ConfigError
from diffax_lab.files import write_atomic
from diffax_lab.metrics.features import params_digest, reference_features
from diffax_lab.models import autoencoder_kl_config, build_unet, compute_dtype
from diffax_lab.models.autoencoder_kl_io import (
    AutoencoderKLLoadError,
    load_autoencoder_kl,
    read_config,
)
from diffax_lab.models.text_context import (
    TokenConditioning,
    TokenEncoder,
    build_token_table,
    check_class_prompts,
    check_text_conditioning,
    conditional_view,
)
from diffax_lab.tasks import registry
from diffax_lab.tasks.base import predict_in_batches
from diffax_lab.tasks.denoising import DenoisingTask

FIELD = "config.latent.autoencoder"
SCALE_RECORD = "latent_scale.json"


def find_autoencoder(path: str, data_config):
    """(kind, directory, AutoencoderKLConfig) of ``path``: kind "run" (a lab autoencoder
    workdir) or "diffusers" (an AutoencoderKL folder, or a pipeline's vae/). Reads configs
    only, no weights; checks the autoencoder takes the data's images."""
    if not path:
        raise ConfigError(
            f"{FIELD} is empty: give the workdir of an autoencoder run (configs/vae.py) or a "
            "diffusers AutoencoderKL folder."
        )
    if not os.path.isdir(path):
        raise ConfigError(f"{FIELD}={path!r} is not a directory.")
    described = None
    cfg_path = os.path.join(path, "config.json")
    if os.path.exists(cfg_path):
        try:
            with open(cfg_path) as f:
                described = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{FIELD}: {cfg_path} is unreadable ({e}).") from e
    if described is not None and "task" in described:
        run = load_run_config(path, FIELD)
        if run.task != "autoencoder":
            raise ConfigError(f"{FIELD}={path!r} is a {run.task!r} run, not an 'autoencoder' run.")
        kind, directory, ae = "run", path, autoencoder_kl_config(run)
    else:
        directory = path
        if described is None and os.path.exists(os.path.join(path, "vae", "config.json")):
            directory = os.path.join(path, "vae")  # a diffusers pipeline
        try:
            kind, ae = "diffusers", read_config(directory)
        except AutoencoderKLLoadError as e:
            raise ConfigError(
                f"{FIELD}={path!r} is neither an autoencoder run (config.json with a task) nor "
                f"a diffusers AutoencoderKL folder: {e}"
            ) from None
    c = data_config
    if ae.in_channels != c.channels or ae.out_channels != c.channels:
        raise ConfigError(
            f"{FIELD}={path!r} maps {ae.in_channels}-channel images to {ae.out_channels}-"
            f"channel ones; the data has data.channels={c.channels}."
        )
    return kind, directory, ae


@registry.register
class LatentDiffusionTask(TokenConditioning, DenoisingTask):
    name = "latent_diffusion"
    metrics = ("loss", "fd", "kid", "pr")

    @classmethod
    def check_config(cls, config) -> None:
        if "text" in config and check_text_conditioning(config) == "pooled":
            raise ConfigError(
                "config.text.conditioning='pooled' is not supported in latent space; use "
                "'tokens' (cross-attention, configs/ldm_text2img.py)."
            )
        super().check_config(conditional_view(config))
        if "latent" not in config:
            raise ConfigError(
                "config.task='latent_diffusion' needs a config.latent section with the "
                "autoencoder (configs/ldm.py)."
            )
        if not isinstance(config.latent.autoencoder, str):
            raise ConfigError(f"{FIELD} must be a directory (a string).")
        check_number(config, "latent.scale_factor", low=0.0)
        check_number(config, "latent.encode_batch_size", low=1, integer=True)
        if config.model.get("name", "unet") != "unet":
            raise ConfigError("config.model.name must be 'unet' for latent diffusion.")
        if config.model.cond_dim:
            raise ConfigError(
                "config.model.cond_dim > 0 (vector conditions) is not supported in latent "
                "space; use model.num_classes for class conditions."
            )
        if "text" in config:
            if config.model.num_classes:
                raise ConfigError(
                    "config.model.num_classes must be 0 with text conditioning (the class "
                    "enters as its caption)."
                )
            check_class_prompts(config)
        elif config.model.get("cross_attention_dim", 0):
            raise ConfigError(
                "config.model.cross_attention_dim > 0 needs a config.text section with "
                "conditioning='tokens' and clip_dir (configs/ldm_text2img.py)."
            )
        if config.data.random_flip:
            raise ConfigError(
                "config.data.random_flip=True would flip the cached latents, not the images; "
                "set it to False for latent diffusion."
            )
        if config.sample.clip_x0:
            raise ConfigError(
                f"config.sample.clip_x0={config.sample.clip_x0} clips the predicted x0, but "
                "scaled latents have unit variance and are not bounded; set it to 0."
            )
        if config.sample.classifier_scale > 0:
            raise ConfigError(
                "config.sample.classifier_scale > 0: classifier guidance needs a classifier of "
                "noisy latents, which the lab does not train; use classifier-free guidance."
            )

    def build(self):
        c = self.config
        self.ae_kind, self.ae_dir, self.ae_config = find_autoencoder(c.latent.autoencoder, c.data)
        s = c.data.image_size
        try:
            self.image_shape = self.ae_config.latent_shape(s, s)  # what the U-Net sees
        except ValueError as e:
            raise ConfigError(f"{FIELD}: {e} (data.image_size={s})") from None
        factor = 2 ** (len(c.model.channel_mult) - 1)
        if self.image_shape[0] % factor:
            raise ConfigError(
                f"The latents are {self.image_shape[0]}x{self.image_shape[1]}: "
                f"config.model.channel_mult={tuple(c.model.channel_mult)} needs a multiple of "
                f"{factor}; use fewer U-Net levels."
            )
        super().build()
        # The U-Net predicts latent channels (the registry's unet predicts data.channels).
        self.model = build_unet(c, out_channels=self.image_shape[-1])
        self.scale_factor = None  # set by train_data (train) or load_resources (sample, eval)

    def default_metrics(self):
        return tuple(m for m in super().default_metrics() if m in self.metrics)

    # ----- the frozen autoencoder -----
    def load_resources(self, workdir: str, mode: str) -> None:
        super().load_resources(workdir, mode)
        if self.ae_kind == "run":
            run, params = registry.restore_run(self.ae_dir, self.mesh, FIELD, task="autoencoder")
            self.vae, self.vae_params = run.frozen_autoencoder(params)
        else:
            try:
                self.vae, self.vae_params, _ = load_autoencoder_kl(
                    self.ae_dir, compute_dtype(self.config)
                )
            except AutoencoderKLLoadError as e:
                raise ConfigError(f"{FIELD}: {e}") from None
        self.vae_params = jax.device_put(self.vae_params, self.repl)
        self.vae_digest = params_digest(self.vae_params)
        if self.tokens:
            c = self.config
            encoder = TokenEncoder(c.text.clip_dir, dtype=compute_dtype(c))
            self.token_table = build_token_table(c, encoder, TEMPLATES)
        if mode != "train":
            self.scale_factor = self.recorded_scale(workdir)

    @functools.cached_property
    def _moments(self):
        """Jitted (vae params, x in [-1, 1]) -> posterior mean | std, on channels."""

        def fn(p, x):
            mean, logvar = self.vae.apply({"params": p}, x, method="encode")
            return jnp.concatenate([mean, jnp.exp(0.5 * logvar)], axis=-1)

        return jax.jit(fn)

    @functools.cached_property
    def _decode(self):
        return jax.jit(lambda p, z: self.vae.apply({"params": p}, z, method="decode"))

    def posteriors(self, images_u8: np.ndarray, split: str, workdir: str) -> np.ndarray:
        """Posterior mean | std [N, h, w, 2 latent_channels] of uint8 images, computed once
        per (images, autoencoder weights) and cached in DIR/latents_<split>_<digest>.npz."""
        task = self

        class Encoder:  # the feature-extractor interface of the cache
            name = f"autoencoder_kl-{self.vae_digest}-{jnp.dtype(self.vae.dtype).name}"

            def __call__(self, x_u8):
                fn = functools.partial(task._moments, task.vae_params)
                return predict_in_batches(fn, x_u8, task.config.latent.encode_batch_size)

        logging.info(
            "Latents of the %s split (%d images): from the cache in %s, else encoded once now...",
            split,
            len(images_u8),
            workdir,
        )
        moments, hit = reference_features(
            Encoder(), self.config.data, split, images_u8, workdir, f"latents_{split}"
        )
        logging.info(
            "Latents of the %s split %s.", split, "read from the cache" if hit else "cached"
        )
        return moments

    def latents(self, moments, key):
        """Scaled latents z * scale, z = mean + std * eps ~ q(z | x), of mean | std moments."""
        mean, std = jnp.split(moments, 2, axis=-1)
        return (mean + std * jax.random.normal(key, mean.shape)) * self.scale_factor

    def decode(self, z_scaled) -> np.ndarray:
        """Images in [-1, 1] (numpy) of scaled latents [N, h, w, c], in batches."""
        bs = self.config.sample.batch_size
        z = np.asarray(z_scaled, np.float32) / self.scale_factor
        n = len(z)
        pad = (-n) % bs
        z = np.concatenate([z, np.zeros((pad, *z.shape[1:]), np.float32)]) if pad else z
        out = [
            np.asarray(self._decode(self.vae_params, z[i : i + bs])) for i in range(0, len(z), bs)
        ]
        return np.concatenate(out)[:n]

    # ----- the latent scale -----
    def record_path(self, workdir: str) -> str:
        return os.path.join(workdir, SCALE_RECORD)

    def read_record(self, workdir: str) -> dict | None:
        path = self.record_path(workdir)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            record = json.load(f)
        if record["autoencoder_digest"] != self.vae_digest:
            raise ConfigError(
                f"{workdir} was trained on the latents of another autoencoder "
                f"({record['autoencoder']!r}, weights {record['autoencoder_digest']}); "
                f"{FIELD}={self.config.latent.autoencoder!r} has weights {self.vae_digest}. "
                "Give the autoencoder it was trained with, or use a new --workdir."
            )
        return record

    def settle_scale(self, moments: np.ndarray, workdir: str) -> float:
        """The scale a training run uses: latent.scale_factor, or LDM's 1 / std over one
        posterior draw of every training image; a resumed run keeps the recorded one."""
        given = float(self.config.latent.scale_factor)
        record = self.read_record(workdir) if workdir_lib.has_checkpoints(workdir) else None
        if record is not None:
            if given and given != record["scale_factor"]:
                raise ConfigError(
                    f"config.latent.scale_factor={given} but {workdir} was trained with "
                    f"{record['scale_factor']}; resume with that value or use a new --workdir."
                )
            return float(record["scale_factor"])
        if given:
            scale = given
        else:
            key = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), 3)
            mean, std = np.split(moments, 2, axis=-1)
            z = mean + std * np.asarray(jax.random.normal(key, mean.shape))
            scale = float(latent.latent_scale_factor(z))
            logging.info(
                "Latent scale factor 1/std = %.5f (std %.4f over %d training latents).",
                scale,
                1.0 / scale,
                len(z),
            )
        record = {
            "scale_factor": scale,
            "estimated": not given,
            "num_examples": int(len(moments)),
            "autoencoder": self.config.latent.autoencoder,
            "autoencoder_digest": self.vae_digest,
        }
        if jax.process_index() == 0:
            os.makedirs(workdir, exist_ok=True)
            write_atomic(self.record_path(workdir), json.dumps(record, indent=2))
        return scale

    def recorded_scale(self, workdir: str) -> float:
        """The scale a trained run used (sample and eval)."""
        record = self.read_record(workdir)
        given = float(self.config.latent.scale_factor)
        if record is None:
            if not given:
                raise ConfigError(
                    f"{os.path.join(workdir, SCALE_RECORD)} is missing: the latent scale the "
                    "run trained with is unknown. Train the run first, or give "
                    "config.latent.scale_factor."
                )
            return given
        if given and given != record["scale_factor"]:
            raise ConfigError(
                f"config.latent.scale_factor={given}, but {workdir} was trained with "
                f"{record['scale_factor']} (latent_scale.json); leave it 0 or give that value."
            )
        return float(record["scale_factor"])

    # ----- text conditioning (text.conditioning = "tokens"): indices into the token table
    @property
    def tokens(self) -> bool:
        return "text" in self.config

    @property
    def uses_condition(self) -> bool:
        return self.tokens or super().uses_condition

    @property
    def num_labels(self) -> int:
        """With text, the classes whose prompts samples ask for (table rows 0..K-1)."""
        return len(self.config.text.class_names) if self.tokens else super().num_labels

    def condition_kwargs(self, cond, train: bool = False, key=None) -> dict:
        if self.tokens:
            return TokenConditioning.condition_kwargs(self, cond, train, key)
        return DenoisingTask.condition_kwargs(self, cond, train, key)

    def uncond_kwargs(self, cond) -> dict | None:
        if self.tokens:
            return TokenConditioning.uncond_kwargs(self, cond)
        return DenoisingTask.uncond_kwargs(self, cond)

    def init_params(self, key):
        if not self.tokens:
            return super().init_params(key)
        x = jnp.zeros((1, *self.image_shape))
        return self.model.init(key, x, jnp.zeros((1,)), **self.context_inputs())["params"]

    # ----- training and the test loss -----
    def train_data(self, workdir: str):
        """(posterior mean | std of every training image, labels): what the steps draw from.
        With text the labels become the indices of each image's caption."""
        imgs, labels = self.load_train_split()
        moments = self.posteriors(imgs, "train", workdir)
        self.scale_factor = self.settle_scale(moments, workdir)
        if self.tokens:
            names = tuple(self.config.text.class_names)
            caps = class_captions(labels, names, TEMPLATES, self.config.seed)
            labels = self.token_table.index(caps)
        return moments.astype(np.float32), labels

    def model_input(self, moments, labels, key):
        """The step's batch is already in latent space: the cached posterior moments."""
        return moments, labels

    def train_loss(self, params, x0, labels, keys):
        """``x0``: posterior moments (``train_data``); the U-Net's loss on one draw of z."""
        drop_key, loss_key, dropout_key = keys
        z = self.latents(x0, jax.random.fold_in(loss_key, 1))
        return super().train_loss(params, z, labels, (drop_key, loss_key, dropout_key))

    def eval_loss(self, params, x_u8, cond, key):
        """The diffusion loss on one posterior draw of the test images' latents.

        The loss evaluator jits this with the U-Net's parameters as its argument, so the
        autoencoder's weights enter the compiled program as constants: fine for the lab's
        VAEs, slow to compile for Stable Diffusion's (84M parameters).
        """
        moments = self._moments(self.vae_params, pipeline.to_model_range(x_u8))
        z = self.latents(moments, jax.random.fold_in(key, 1))
        fn = self.model_fn(params, cond if self.uses_condition else None)
        return self.loss_fn(fn, z, key)

    # ----- sampling: latents decoded to images -----
    def generate(self, params, num, key, labels=None, num_trajectory=0, **kwargs):
        """DenoisingTask.generate in latent space, then decoded: (images in [-1, 1],
        the decoded trajectory x_t of the first batch, its times)."""
        z, traj, times = super().generate(
            params, num, key, labels=labels, num_trajectory=num_trajectory, **kwargs
        )
        if traj is not None:
            traj = np.stack([self.decode(frame) for frame in traj])
        return self.decode(z), traj, times

    def forward_strip(self, image_uint8: np.ndarray, num: int, key) -> tuple:
        """A test image, then its latent (posterior mean, scaled) noised to num - 1 evenly
        spaced t and decoded."""
        T = self.schedule.num_steps
        steps = np.round(np.linspace(0, T - 1, num - 1)).astype(np.int32)
        x = pipeline.to_model_range(image_uint8[None])
        mean, _ = jnp.split(self._moments(self.vae_params, x), 2, axis=-1)
        z0 = jnp.broadcast_to(mean * self.scale_factor, (num - 1, *mean.shape[1:]))
        zt = process.q_sample(
            z0, self.schedule.alphas_cumprod[steps], jax.random.normal(key, z0.shape)
        )
        frames = np.concatenate([image_uint8[None], np.asarray(pipeline.to_uint8(self.decode(zt)))])
        times = np.concatenate([[0.0], np.asarray(self.schedule.times)[steps]])
        return frames, times

    def sampling_info(self) -> dict:
        return {
            **super().sampling_info(),
            "latent_shape": list(self.image_shape),
            "latent_scale_factor": self.scale_factor,
        }
