"""``reconstruction``: how well an autoencoder reconstructs held-out images and what its
code costs, on the test split (``task.test_batches()``: eval.num_examples in whole batches)
with the EMA weights.

Through the task's hook ``reconstruct(params, x) -> (x_rec, mean, logvar)`` (x in [-1, 1];
x_rec the decoding of the posterior mean, as diffusers' ``AutoencoderKL`` reconstructs by
default): per image, in the model's [-1, 1] range and before any rounding to uint8,

    recon_mse   mean over pixels of (x_rec - x)^2;    recon_l1   of |x_rec - x|
    recon_psnr  10 log10(2^2 / mse) dB (``diffusion.latent.psnr``), averaged over images;
                recon_psnr_of_mean_mse is the same of the mean MSE (the dataset-level figure)
    rate_bpd    KL(q(z | x) || N(0, I)) in bits per data dimension (H W C), the cost of the
                code under the prior (``diffusion.latent.rate_bits_per_dim``)

each reported as the mean over the images. Not for: sample quality (``sample_quality``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from diffax_lab.data import pipeline
from diffax_lab.diffusion import latent
from diffax_lab.errors import ConfigError
from diffax_lab.evaluators import Context, EvaluatorBase


class Evaluator(EvaluatorBase):
    during_training = True

    def prepare(self):
        if not hasattr(self.task, "reconstruct"):
            raise ConfigError(
                f"config.eval.metrics asks for 'reconstruction', but a {self.task.name!r} "
                "task has no reconstruct(params, x) hook (an autoencoder has)."
            )
        self.images, _, self.bs = self.task.test_batches()
        task = self.task

        @jax.jit
        def per_image(params, x_u8):
            x = pipeline.to_model_range(x_u8)
            x_rec, mean, logvar = task.reconstruct(params, x)
            err = x_rec - x
            axes = tuple(range(1, x.ndim))
            return {
                "mse": jnp.mean(jnp.square(err), axis=axes),
                "l1": jnp.mean(jnp.abs(err), axis=axes),
                "psnr": latent.psnr(x, x_rec),
                "rate_bpd": latent.rate_bits_per_dim(mean, logvar, math.prod(x.shape[1:])),
            }

        self.per_image = per_image

    def run(self, ctx: Context) -> dict:
        parts = [
            jax.device_get(self.per_image(ctx.params, self.images[i : i + self.bs]))
            for i in range(0, len(self.images), self.bs)
        ]
        per = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        mse = float(per["mse"].mean())
        return {
            "recon_num_examples": len(self.images),
            "recon_mse": mse,
            "recon_l1": float(per["l1"].mean()),
            "recon_psnr": float(per["psnr"].mean()),
            "recon_psnr_of_mean_mse": float(10.0 * np.log10(4.0 / mse)),
            "rate_bpd": float(per["rate_bpd"].mean()),
        }
