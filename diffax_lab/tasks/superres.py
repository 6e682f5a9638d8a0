"""Super-resolution diffusion with Gaussian conditioning augmentation (``config.task =
"superres"``; SR3, Saharia et al. 2021; Cascaded Diffusion Models, Ho et al. 2021).

A U-Net (``models/sr_unet.py``) denoises the high-resolution x_t given
concat(x_t, upsample(z_s)), where z_s is the low-resolution image noised to level s
(``diffusion/conditioning.py``). The low-resolution image is the area downsampling of the
training image by ``superres.factor``. At training time s ~ U[0, superres.aug_max] per
example; at sampling time s = ``sample.aug_level`` (a flag: ``--config.sample.aug_level``).

How s reaches the network: through the U-Net's ``cond`` vector input (a sinusoidal
embedding of 1000 s, projected and added to the time embedding). That is where CDM and
Imagen put it, it takes a continuous level (the class path takes integers only), and it
leaves the time path alone. ``model.cond_dim`` is the embedding's width.

The per-example condition is one array [B, h, w, C + 1]: the augmented low-resolution image
and a constant band holding s. So every sampler and both guidance kinds of
``DenoisingTask`` see an ordinary per-example condition (nothing is copied from them);
classifier-free guidance (``train.p_uncond`` > 0) drops the image and the level together.

Evaluation (``--mode=eval``): ``eval.num_samples`` test images are downsampled and
upsampled again; ``psnr``/``ssim`` against the real test images, ``fd``/``kid``/``pr`` and
the judge's accuracy on the test labels with ``eval.judge_workdir`` (a clean classifier at
the high resolution).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from diffax_lab import images
from diffax_lab.config_lib import check_number
from diffax_lab.data import load_split, pipeline
from diffax_lab.diffusion import conditioning
from diffax_lab.errors import ConfigError
from diffax_lab.models import build_unet
from diffax_lab.models.sr_unet import SRUNet
from diffax_lab.tasks.denoising import DenoisingTask
from diffax_lab.tasks.registry import register

AUG_KEY = 7  # fold_in tag of the key that noises the low-resolution input at sampling


def pack(low_res, level):
    """[B, h, w, C] image and [B] level -> the condition [B, h, w, C + 1]."""
    band = jnp.broadcast_to(
        jnp.asarray(level, jnp.float32).reshape(-1, 1, 1, 1), (*low_res.shape[:3], 1)
    )
    return jnp.concatenate([low_res, band], -1)


def unpack(cond):
    """The condition -> (low-resolution image, level [B])."""
    return cond[..., :-1], cond[:, 0, 0, -1]


@register
class SuperResTask(DenoisingTask):
    name = "superres"
    section = "superres"
    section_hint = "factor, aug_max: see configs/superres.py"
    metrics = ("loss", "psnr", "ssim", "fd", "kid", "pr")

    @classmethod
    def check_config(cls, config) -> None:
        super().check_config(config)
        check_number(config, "superres.factor", low=2, integer=True)
        check_number(config, "superres.aug_max", low=0.0, high=1.0)
        check_number(config, "sample.aug_level", low=0.0, high=1.0)
        f, size = config.superres.factor, config.data.image_size
        if size % f:
            raise ConfigError(
                f"config.data.image_size={size} (the high resolution) must be a multiple of "
                f"config.superres.factor={f}."
            )
        check_number(config, "model.cond_dim", low=2, integer=True)
        if config.model.num_classes:
            raise ConfigError(
                "config.model.num_classes must be 0 for superres (it is conditioned on the "
                "low-resolution image)."
            )
        if config.model.get("name", "unet") != "unet":
            raise ConfigError("config.model.name must be 'unet' for superres.")
        if config.sample.classifier_scale > 0:
            raise ConfigError("config.sample.classifier_scale must be 0 for superres.")
        if config.train.sample_every:
            raise ConfigError(
                "config.train.sample_every must be 0 for superres; draw its grid with "
                "--mode=sample."
            )

    def build(self):
        super().build()
        self.model = SRUNet(unet=build_unet(self.config))
        self.factor = self.config.superres.factor
        self.low_size = self.config.data.image_size // self.factor

    def default_metrics(self):
        judge = ("fd",) if self.config.eval.judge_workdir else ()
        return ("loss", "psnr", "ssim", *judge)

    # ----- the condition -----
    @property
    def uses_condition(self) -> bool:
        return True

    def low_res(self, x):
        """Area downsampling of high-resolution x [B, H, W, C] (any range)."""
        return conditioning.area_downsample(x, self.factor)

    def make_condition(self, x_lr, level, key):
        """The condition of low-resolution images x_lr [B, h, w, C] in [-1, 1] at levels
        ``level`` (scalar or [B]): noised with ``key``, then packed with the level."""
        level = jnp.broadcast_to(jnp.asarray(level, jnp.float32), x_lr.shape[:1])
        return pack(conditioning.augment(x_lr, level, key), level)

    def model_input(self, images, labels, key):
        """x0 and its training condition: area-downsampled, noised at s ~ U[0, aug_max]."""
        flip_key, level_key, noise_key = jax.random.split(key, 3)
        x0, _ = super().model_input(images, labels, flip_key)
        b = x0.shape[0]
        level = jax.random.uniform(level_key, (b,), maxval=self.config.superres.aug_max)
        return x0, self.make_condition(self.low_res(x0), level, noise_key)

    def condition_kwargs(self, cond, train=False, key=None):
        low, level = unpack(cond)
        on = jnp.ones(cond.shape[:1], bool)
        if train and self.config.train.p_uncond > 0:
            on = ~jax.random.bernoulli(key, self.config.train.p_uncond, cond.shape[:1])
        return {"low_res": low, "level": level, "mask": on}

    def uncond_kwargs(self, cond):
        if self.config.train.p_uncond == 0:
            return None
        low, level = unpack(cond)
        return {"low_res": low, "level": level, "mask": jnp.zeros(cond.shape[:1], bool)}

    def sample_conditions(self, num, labels=None):
        if labels is None:  # the first test images, downsampled, at sample.aug_level
            x_lr = self.low_res(pipeline.to_model_range(self.test_images(num)))
            key = jax.random.fold_in(jax.random.PRNGKey(self.config.sample.seed), AUG_KEY)
            labels = self.make_condition(x_lr, self.config.sample.aug_level, key)
        return np.asarray(labels, np.float32)

    def requested_labels(self, n):
        return None

    # ----- the network -----
    def init_params(self, key):
        h = self.low_size
        x = jnp.zeros((1, *self.image_shape))
        low = jnp.zeros((1, h, h, self.image_shape[-1]))
        return self.model.init(key, x, jnp.zeros((1,)), low, jnp.zeros((1,)))["params"]

    def eval_loss(self, params, x_u8, cond, key):
        """The loss of a test batch conditioned at s = sample.aug_level (never dropped)."""
        aug_key, loss_key = jax.random.split(key)
        x0 = pipeline.to_model_range(x_u8)
        c = self.make_condition(self.low_res(x0), self.config.sample.aug_level, aug_key)
        return self.loss_fn(self.model_fn(params, c), x0, loss_key)

    # ----- upsampling -----
    def test_images(self, n: int) -> np.ndarray:
        imgs = load_split(self.config.data, "test")[0]
        if n > len(imgs):
            raise ConfigError(
                f"{n} test images asked (sample.num / eval.num_samples) but the test split "
                f"has {len(imgs)}."
            )
        return imgs[:n]

    def upsample(self, params, x_lr, key, aug_level=None, guidance_scale=None):
        """High-resolution images (float [-1, 1], numpy) from low-resolution x_lr in [-1, 1],
        noised to ``aug_level`` (default sample.aug_level) with a key from ``key``."""
        level = self.config.sample.aug_level if aug_level is None else aug_level
        x_lr = jnp.asarray(x_lr, jnp.float32)
        if x_lr.shape[1:] != (self.low_size, self.low_size, self.image_shape[-1]):
            raise ConfigError(
                f"This upsampler takes {self.low_size}x{self.low_size}x{self.image_shape[-1]} "
                f"images, not {'x'.join(map(str, x_lr.shape[1:]))}."
            )
        cond = self.make_condition(x_lr, level, jax.random.fold_in(key, AUG_KEY))
        out, _, _ = self.generate(
            params, len(x_lr), key, labels=np.asarray(cond), guidance_scale=guidance_scale
        )
        return out

    def paired_reference(self, n: int) -> np.ndarray:
        """The real high-resolution images that eval_samples' first n outputs upsample."""
        return self.test_images(n)

    def eval_samples(self, params, num, key):
        real = self.test_images(num)
        x_lr = self.low_res(pipeline.to_model_range(real))
        out = self.upsample(params, x_lr, key)
        labels = load_split(self.config.data, "test")[1][:num]
        info = {**self.sampling_info(), "aug_level": self.config.sample.aug_level}
        return np.asarray(pipeline.to_uint8(out)), labels, info

    def sample_tag(self) -> str:
        return super().sample_tag() + f"_aug{self.config.sample.aug_level:g}"

    def sample_stem(self, step):
        return super().sample_stem(step) + f"_aug{self.config.sample.aug_level:g}"

    def sample(self, params, workdir, step, key, labels=None):
        """The grid of upsampled test images, and rows low-res / upsampled / real."""
        n = self.config.sample.num
        real = self.test_images(n)
        x_lr = self.low_res(pipeline.to_model_range(real))
        cond = self.make_condition(
            x_lr, self.config.sample.aug_level, jax.random.fold_in(key, AUG_KEY)
        )
        out = super().sample(params, workdir, step, key, labels=np.asarray(cond))
        size = self.config.data.image_size
        shown = np.asarray(pipeline.to_uint8(conditioning.resize_up(x_lr, size, "nearest")))
        path = os.path.join(workdir, "samples", self.sample_stem(step) + "_rows.png")
        names = [
            f"{self.low_size}px input",
            f"upsampled (s={self.config.sample.aug_level:g})",
            "real",
        ]
        images.save_labelled_rows(path, [shown, out["samples"], real], names)
        logging.info("Wrote low-res / upsampled / real rows to %s.", path)
        return {**out, "rows": path}
