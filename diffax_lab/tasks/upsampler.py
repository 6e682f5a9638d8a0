"""The regression upsampler (``config.task = "upsampler"``): SRResNet (``models/srresnet.py``)
trained with an L1 or L2 loss to map the area-downsampled image back to the image. The
baseline that the super-resolution diffusion model (tasks/superres.py) must beat, in the
same evaluation: ``psnr``/``ssim`` against the real high-resolution test images, and the
judge's ``fd``/accuracy of the upsampled test images (``eval.judge_workdir``).

The section ``upsampler``: factor (a power of 2), features, num_blocks, loss (l1 | l2).
A regression to the mean is sharp where the input decides the output and blurry where it
does not; that is the gap diffusion closes.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from diffax_lab import images
from diffax_lab.config_lib import check_choice, check_number
from diffax_lab.data import load_split, pipeline
from diffax_lab.diffusion import conditioning
from diffax_lab.errors import ConfigError
from diffax_lab.models.srresnet import build_srresnet
from diffax_lab.tasks.base import Task
from diffax_lab.tasks.denoising import check_sample_metric_fields
from diffax_lab.tasks.registry import register


@register
class UpsamplerTask(Task):
    name = "upsampler"
    section = "upsampler"
    section_hint = "factor, features, num_blocks, loss: see configs/upsampler.py"
    can_sample = True
    metrics = ("loss", "psnr", "ssim", "fd", "kid", "pr")

    @classmethod
    def check_config(cls, config) -> None:
        super().check_config(config)
        f = config.upsampler.factor
        check_number(config, "upsampler.factor", low=2, integer=True)
        if f & (f - 1):
            raise ConfigError(f"config.upsampler.factor={f} must be a power of 2 (2, 4, 8).")
        if config.data.image_size % f:
            raise ConfigError(
                f"config.data.image_size={config.data.image_size} (the high resolution) must "
                f"be a multiple of config.upsampler.factor={f}."
            )
        check_number(config, "upsampler.features", low=1, integer=True)
        check_number(config, "upsampler.num_blocks", low=0, integer=True)
        check_number(config, "upsampler.groups", low=1, integer=True)
        if config.upsampler.features % config.upsampler.groups:
            raise ConfigError(
                f"config.upsampler.groups={config.upsampler.groups} must divide "
                f"config.upsampler.features={config.upsampler.features}."
            )
        check_choice(config, "upsampler.loss", ("l1", "l2"))
        check_number(config, "sample.num", low=1, integer=True)
        check_number(config, "sample.batch_size", low=1, integer=True)
        check_sample_metric_fields(config)
        if config.train.sample_every:
            raise ConfigError(
                "config.train.sample_every must be 0 for the upsampler; draw its grid with "
                "--mode=sample."
            )

    def build(self):
        u = self.config.upsampler
        self.factor = u.factor
        self.low_size = self.config.data.image_size // u.factor
        self.model = build_srresnet(self.config)

    def default_metrics(self):
        judge = ("fd",) if self.config.eval.judge_workdir else ()
        return ("loss", "psnr", "ssim", *judge)

    def init_params(self, key):
        h, c = self.low_size, self.config.data.channels
        return self.model.init(key, jnp.zeros((1, h, h, c)))["params"]

    def low_res(self, x):
        return conditioning.area_downsample(x, self.factor)

    def model_input(self, images_u8, labels, key):
        """x0 (flipped with data.random_flip) and its area downsampling as the input."""
        x0, _ = super().model_input(images_u8, labels, key)
        return x0, self.low_res(x0)

    def loss_of(self, params, x0, x_lr):
        err = self.model.apply({"params": params}, x_lr) - x0
        per = jnp.abs(err) if self.config.upsampler.loss == "l1" else jnp.square(err)
        return jnp.mean(per), {"mse": jnp.mean(jnp.square(err))}

    def train_loss(self, params, x0, x_lr, keys):
        return self.loss_of(params, x0, x_lr)

    def eval_loss(self, params, x_u8, cond, key):
        x0 = pipeline.to_model_range(x_u8)
        return self.loss_of(params, x0, self.low_res(x0))

    # ----- upsampling -----
    @functools.cached_property
    def _predict(self):
        return jax.jit(lambda params, x: self.model.apply({"params": params}, x))

    def upsample(self, params, x_lr, key=None, **unused):
        """High-resolution float [-1, 1] (numpy) from x_lr in [-1, 1], in sample batches.
        Deterministic: ``key`` and the diffusion options (aug_level, ...) are ignored."""
        x_lr = np.asarray(x_lr, np.float32)
        want = (self.low_size, self.low_size, self.config.data.channels)
        if x_lr.shape[1:] != want:
            raise ConfigError(
                f"This upsampler takes {'x'.join(map(str, want))} images, not "
                f"{'x'.join(map(str, x_lr.shape[1:]))}."
            )
        bs = self.config.sample.batch_size
        return np.concatenate(
            [np.asarray(self._predict(params, x_lr[i : i + bs])) for i in range(0, len(x_lr), bs)]
        )

    def test_images(self, n: int) -> np.ndarray:
        imgs = load_split(self.config.data, "test")[0]
        if n > len(imgs):
            raise ConfigError(
                f"{n} test images asked (sample.num / eval.num_samples) but the test split "
                f"has {len(imgs)}."
            )
        return imgs[:n]

    def paired_reference(self, n: int) -> np.ndarray:
        return self.test_images(n)

    def eval_samples(self, params, num, key):
        real = self.test_images(num)
        out = self.upsample(params, self.low_res(pipeline.to_model_range(real)))
        labels = load_split(self.config.data, "test")[1][:num]
        info = {"upsampler": "srresnet", "loss_kind": self.config.upsampler.loss}
        return np.asarray(pipeline.to_uint8(out)), labels, info

    def sample(self, params, workdir, step, key):
        """Rows: the low-resolution inputs (nearest), the upsampled, the real test images."""
        n = self.config.sample.num
        real = self.test_images(n)
        x_lr = self.low_res(pipeline.to_model_range(real))
        out = np.asarray(pipeline.to_uint8(self.upsample(params, x_lr)))
        size = self.config.data.image_size
        shown = np.asarray(pipeline.to_uint8(conditioning.resize_up(x_lr, size, "nearest")))
        out_dir = os.path.join(workdir, "samples")
        stem = f"upsampled_step_{step:06d}"
        grid = os.path.join(out_dir, stem + ".png")
        images.save_grid(grid, out)
        rows = os.path.join(out_dir, stem + "_rows.png")
        images.save_labelled_rows(
            rows, [shown, out, real], [f"{self.low_size}px input", "SRResNet", "real"]
        )
        if jax.process_index() == 0:
            np.savez_compressed(os.path.join(out_dir, stem + ".npz"), images=out)
        logging.info("Wrote %s and %s.", grid, rows)
        return {"step": step, "grid": grid, "rows": rows, "samples": out}
