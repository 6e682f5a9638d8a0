"""The KL autoencoder of latent diffusion (``config.task = "autoencoder"``; configs/vae.py).

diffusers' ``AutoencoderKL`` (``models/vae.py``, built from ``config.autoencoder`` by the
model registry's ``autoencoder_kl``) trained with LDM's objective without its perceptual
(LPIPS) and adversarial terms (``diffusion/latent.py``, ``autoencoder_loss``): the summed L1
(or L2) error of the decoded posterior sample z ~ q(z | x), plus ``kl_weight`` times
KL(q(z | x) || N(0, I)); with ``learn_output_logvar`` LDM's learned scalar s divides the
error by exp(s) and adds s per pixel. The parameters are ``{"autoencoder": <the VAE's tree>}``
(plus ``"output_logvar"`` when it is learned).

Evaluation: ``reconstruction`` (test MSE, PSNR and the rate in bits/dim of the posterior
mean's decoding; ``evaluators/reconstruction.py`` through the ``reconstruct`` hook), ``loss``
(the objective on test images) and, with a judge, ``fd``/``kid``/``pr`` of prior samples
decode(z), z ~ N(0, I): the VAE as a generative model, in the table of the diffusion models.
With LDM's small kl_weight (1e-6) the aggregate posterior is far from N(0, I) and prior
samples are poor by design; the latent diffusion model (tasks/latent_diffusion.py) learns
the latent distribution instead.

``--mode=sample``: ``samples/reconstructions_step_N.png`` (rows alternate real test images
and their reconstructions) and ``samples/prior_step_N.png`` (+ ``.npz`` of both).
After training, ``DIR/hf_vae``: a diffusers AutoencoderKL folder of the EMA weights whose
``scaling_factor`` is LDM's 1 / std of the posterior samples of the first
``autoencoder.scale_num_examples`` training images.

LDM's patch-GAN (``autoencoder.discriminator=True``; ``models/discriminator.py``, the maths
in ``diffusion/latent.py``): the parameters become ``{"autoencoder", "disc", "disc_clock"}``
and ``train_loss`` returns L_G + L_D, where
    L_G = nll + kl_weight kl + lambda f(step) (-mean D_sg(x_hat))   (D_sg: stop_gradient on
          the discriminator's parameters, so L_G trains only the autoencoder)
    L_D = f(step) hinge(D(x), D(sg(x_hat)))                         (sg on the
          reconstructions, so L_D trains only the discriminator)
with f(step) = ``disc_factor`` from ``disc_start`` on (0 before) and LDM's adaptive weight
lambda = ``disc_weight`` ||grad_W nll|| / (||grad_W L_adv|| + 1e-4), W the decoder's last
convolution kernel, both gradients taken in the step by one vector-Jacobian product of the
autoencoder (nothing of it is differentiated). One backward pass of the sum then gives each
network exactly its own gradient, and the one optimizer of ``tasks/base.py`` updates both
**simultaneously**, where LDM alternates (optimizer_idx 0 and 1 on the same batch, the
discriminator seeing the decoder's outputs from before the decoder's update); with Adam's
per-parameter scaling the only difference is that half-step of staleness. The step count is
``disc_clock``, a parameter whose optimizer update is +1 a step whatever its gradient (the
train step of tasks/base.py does not pass the step to the loss). Differences from LDM: the
discriminator has no BatchNorm (``norm="none"``: running statistics are no parameters of the
one-optimizer state) and there is no LPIPS term.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from diffax_lab import images
from diffax_lab.config_lib import check_choice, check_number, get_field
from diffax_lab.data import DataError, load_split, pipeline
from diffax_lab.diffusion import latent
from diffax_lab.errors import ConfigError
from diffax_lab.models import DTYPES, autoencoder_kl_config, get_model
from diffax_lab.models.autoencoder_kl_io import save_autoencoder_kl
from diffax_lab.models.discriminator import NLayerDiscriminator
from diffax_lab.models.vae import LAST_LAYER
from diffax_lab.tasks.base import Task, predict_in_batches
from diffax_lab.tasks.denoising import check_sample_metric_fields
from diffax_lab.tasks.registry import register

ROW = 8  # images per row of the reconstruction grid


def check_bool(config, field: str) -> None:
    value = get_field(config, field)
    if not isinstance(value, bool):
        raise ConfigError(f"config.{field} must be True or False, got {value!r}.")


def _count_steps() -> optax.GradientTransformation:
    """An optax transformation whose update is +1 whatever the gradient: a step clock."""
    return optax.GradientTransformation(
        lambda params: optax.EmptyState(),
        lambda updates, state, params=None: (jax.tree.map(jnp.ones_like, updates), state),
    )


@register
class AutoencoderTask(Task):
    name = "autoencoder"
    section = "autoencoder"
    section_hint = "see configs/vae.py"
    can_sample = True
    metrics = ("loss", "reconstruction", "fd", "kid", "pr")

    @classmethod
    def check_config(cls, config) -> None:
        super().check_config(config)
        if config.model.get("name") != "autoencoder_kl":
            raise ConfigError(
                f"config.model.name={config.model.get('name')!r}: the autoencoder task trains "
                "'autoencoder_kl' (its architecture is the config.autoencoder section)."
            )
        check_choice(config, "model.dtype", tuple(DTYPES))
        a = config.autoencoder
        blocks = tuple(a.block_out_channels)
        if not blocks or any(
            isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in blocks
        ):
            raise ConfigError(
                f"config.autoencoder.block_out_channels={blocks!r} must be positive integers."
            )
        for f in ("layers_per_block", "latent_channels", "norm_num_groups"):
            check_number(config, "autoencoder." + f, low=1, integer=True)
        for f in ("mid_block_add_attention", "use_quant_conv", "use_post_quant_conv"):
            check_bool(config, "autoencoder." + f)
        check_choice(config, "autoencoder.reconstruction", latent.RECONSTRUCTIONS)
        check_number(config, "autoencoder.kl_weight", low=0.0)
        check_bool(config, "autoencoder.learn_output_logvar")
        check_number(config, "autoencoder.output_logvar_init")
        check_number(config, "autoencoder.scale_num_examples", low=1, integer=True)
        check_bool(config, "autoencoder.discriminator")
        if a.discriminator:
            check_number(config, "autoencoder.disc_start", low=0, integer=True)
            check_number(config, "autoencoder.disc_weight", low=0.0)
            check_number(config, "autoencoder.disc_factor", low=0.0)
            check_choice(config, "autoencoder.disc_loss", latent.DISCRIMINATOR_LOSSES)
            check_number(config, "autoencoder.disc_ndf", low=1, integer=True)
            check_number(config, "autoencoder.disc_layers", low=1, integer=True)
        ae = autoencoder_kl_config(config)  # ConfigError naming what cannot be built
        s = config.data.image_size
        if s % ae.downsample_factor:
            raise ConfigError(
                f"config.data.image_size={s} must be a multiple of the autoencoder's "
                f"downsampling factor {ae.downsample_factor} = 2^(len(autoencoder."
                "block_out_channels) - 1); pad or resize the data, or use fewer levels."
            )
        check_number(config, "sample.num", low=1, integer=True)
        check_number(config, "sample.batch_size", low=1, integer=True)
        check_number(config, "sample.seed", low=0, integer=True)
        check_sample_metric_fields(config)

    def build(self):
        c = self.config
        self.ae_config = autoencoder_kl_config(c)
        self.model = get_model(c)
        self.latent_shape = self.ae_config.latent_shape(c.data.image_size, c.data.image_size)
        a = c.autoencoder
        self.disc = None
        if a.discriminator:
            self.disc = NLayerDiscriminator(
                a.disc_ndf, a.disc_layers, norm="none", dtype=DTYPES[c.model.dtype]
            )

    # The optimizer of tasks/base.py (assigned in Task.__init__) gets the step clock added.
    @property
    def tx(self):
        return self._tx

    @tx.setter
    def tx(self, value):
        if self.config.autoencoder.discriminator:
            value = optax.multi_transform(
                {"train": value, "clock": _count_steps()},
                lambda p: {k: ("clock" if k == "disc_clock" else "train") for k in p},
            )
        self._tx = value

    def default_metrics(self):
        judge = ("fd", "kid", "pr") if self.config.eval.judge_workdir else ()
        return ("loss", "reconstruction", *judge)

    # ----- the network and its loss -----
    def init_params(self, key):
        a = self.config.autoencoder
        x = jnp.zeros((1, *self.image_shape))
        params = {"autoencoder": self.model.init(key, x)["params"]}
        if a.learn_output_logvar:
            params["output_logvar"] = jnp.asarray(a.output_logvar_init, jnp.float32)
        if self.disc is not None:
            params["disc"] = self.disc.init(jax.random.fold_in(key, 1), x)["params"]
            params["disc_clock"] = jnp.zeros((), jnp.float32)  # steps taken (see tx)
        return params

    def train_loss(self, params, x0, labels, keys):
        a = self.config.autoencoder
        _, posterior_key, _ = keys

        def forward(p):
            x_rec, mean, logvar = self.model.apply({"params": p}, x0, key=posterior_key)
            return x_rec, (mean, logvar)

        if self.disc is None:
            (x_rec, (mean, logvar)), vjp = forward(params["autoencoder"]), None
        else:
            x_rec, vjp, (mean, logvar) = jax.vjp(forward, params["autoencoder"], has_aux=True)
        s = params["output_logvar"] if a.learn_output_logvar else a.output_logvar_init

        def loss_g(x_rec, logits_fake=None, weight=0.0):
            return latent.autoencoder_loss(
                x0,
                x_rec,
                mean,
                logvar,
                kl_weight=a.kl_weight,
                reconstruction=a.reconstruction,
                output_logvar=s,
                logits_fake=logits_fake,
                adversarial_weight=weight,
            )

        if self.disc is None:
            loss, aux = loss_g(x_rec)
            del aux["adversarial"]  # no discriminator: always 0
        else:
            loss, aux = self.adversarial_losses(params, x0, x_rec, vjp, loss_g)
        aux["psnr"] = jnp.mean(latent.psnr(x0, x_rec))
        if a.learn_output_logvar:
            aux["output_logvar"] = s
        return loss, aux

    def adversarial_losses(self, params, x0, x_rec, vjp, loss_g):
        """(L_G + L_D, aux) of the module docstring; ``vjp`` of the autoencoder's forward
        pass gives the last-layer gradients of the adaptive weight."""
        a = self.config.autoencoder
        disc = self.disc.apply
        frozen = jax.lax.stop_gradient(params["disc"])
        factor = latent.discriminator_factor(
            jax.lax.stop_gradient(params["disc_clock"]), a.disc_start, a.disc_factor
        )
        weight = self.adaptive_weight(x_rec, frozen, vjp, loss_g)
        logits_fake = disc({"params": frozen}, x_rec)
        loss_gen, aux = loss_g(x_rec, logits_fake, weight * factor)
        real = disc({"params": params["disc"]}, jax.lax.stop_gradient(x0))
        fake = disc({"params": params["disc"]}, jax.lax.stop_gradient(x_rec))
        loss_disc = factor * latent.discriminator_loss(real, fake, a.disc_loss)
        aux.update(
            loss_g=loss_gen,
            loss_d=loss_disc,
            adaptive_weight=weight,
            disc_factor=factor,
            logits_real=jnp.mean(real),
            logits_fake=jnp.mean(fake),
        )
        return loss_gen + loss_disc, aux

    def adaptive_weight(self, x_rec, disc_params, vjp, loss_g):
        """LDM's lambda: disc_weight ||grad_W nll|| / (||grad_W L_adv|| + 1e-4), W the
        decoder's last kernel, through the autoencoder's vector-Jacobian product (XLA keeps
        only the last layer's part of those backward passes)."""
        x_rec = jax.lax.stop_gradient(x_rec)

        def last_layer_grad(loss_of_x_rec):
            g = jax.grad(loss_of_x_rec)(x_rec)
            (grads,) = vjp(g)
            for k in LAST_LAYER:
                grads = grads[k]
            return grads

        nll_grad = last_layer_grad(lambda xr: loss_g(xr)[1]["nll"])
        adv_grad = last_layer_grad(
            lambda xr: latent.generator_adversarial_loss(
                self.disc.apply({"params": disc_params}, xr)
            )
        )
        return latent.adaptive_adversarial_weight(
            nll_grad, adv_grad, disc_weight=self.config.autoencoder.disc_weight
        )

    # ----- hooks of evaluators and of the latent diffusion task -----
    def reconstruct(self, params, x):
        """(decoding of the posterior mean, mean, logvar) of images x in [-1, 1]: the hook of
        the ``reconstruction`` evaluator."""
        return self.model.apply({"params": params["autoencoder"]}, x)

    def frozen_autoencoder(self, params):
        """(AutoencoderKL module, its parameters) of a trained run, for a latent model."""
        return self.model, params["autoencoder"]

    @functools.cached_property
    def _encode(self):
        """Jitted (params, x) -> mean | logvar concatenated on channels."""

        def fn(params, x):
            mean, logvar = self.model.apply({"params": params["autoencoder"]}, x, method="encode")
            return jnp.concatenate([mean, logvar], axis=-1)

        return jax.jit(fn)

    @functools.cached_property
    def _decode(self):
        return jax.jit(
            lambda p, z: self.model.apply({"params": p["autoencoder"]}, z, method="decode")
        )

    @functools.cached_property
    def _reconstruct(self):
        return jax.jit(lambda p, x: self.reconstruct(p, x)[0])

    def reconstructions(self, params, images_u8: np.ndarray) -> np.ndarray:
        """uint8 reconstructions (posterior means decoded) of uint8 images."""
        bs = self.config.eval.batch_size
        rec = predict_in_batches(functools.partial(self._reconstruct, params), images_u8, bs)
        return np.asarray(pipeline.to_uint8(rec))

    def prior_samples(self, params, num: int, key) -> np.ndarray:
        """uint8 decode(z) of ``num`` draws z ~ N(0, I), in batches of sample.batch_size."""
        bs = self.config.sample.batch_size
        out = []
        for b in range(-(-num // bs)):
            z = jax.random.normal(jax.random.fold_in(key, b), (bs, *self.latent_shape))
            out.append(np.asarray(pipeline.to_uint8(self._decode(params, z))))
        return np.concatenate(out)[:num]

    def eval_samples(self, params, num: int, key):
        """Prior samples for fd/kid/pr (unlabelled)."""
        info = {"sampler": "vae_prior", "latent_shape": list(self.latent_shape)}
        return self.prior_samples(params, num, key), None, info

    def sample_tag(self) -> str:
        return f"prior_n{self.config.eval.num_samples}"

    # ----- outputs -----
    def real_images(self, num: int) -> np.ndarray:
        """The first ``num`` test images (training images when there is no test split)."""
        try:
            return load_split(self.config.data, "test")[0][:num]
        except DataError:
            return load_split(self.config.data, "train")[0][:num]

    def write_reconstructions(self, params, path: str, real_u8: np.ndarray) -> np.ndarray:
        """Rows of ROW real images, each followed by the row of their reconstructions."""
        per = min(ROW, len(real_u8))
        real_u8 = real_u8[: len(real_u8) // per * per]
        rec = self.reconstructions(params, real_u8)
        rows, names = [], []
        for i in range(0, len(real_u8), per):
            rows += [real_u8[i : i + per], rec[i : i + per]]
            names += ["real", "reconstructed"]
        images.save_labelled_rows(path, rows, names)
        return rec

    def write_samples(self, params, workdir: str, step: int, key) -> str:
        path = os.path.join(workdir, "samples", f"reconstructions_step_{step:06d}.png")
        self.write_reconstructions(params, path, self.real_images(self.config.sample.num))
        logging.info("Wrote reconstructions (EMA) to %s.", path)
        return path

    def sample(self, params, workdir: str, step: int, key) -> dict:
        """Reconstructions of sample.num test images and sample.num prior samples."""
        num = self.config.sample.num
        out_dir = os.path.join(workdir, "samples")
        rec_path = os.path.join(out_dir, f"reconstructions_step_{step:06d}.png")
        real = self.real_images(num)
        rec = self.write_reconstructions(params, rec_path, real)
        prior = self.prior_samples(params, num, key)
        prior_path = os.path.join(out_dir, f"prior_step_{step:06d}.png")
        images.save_grid(prior_path, prior)
        npz = os.path.join(out_dir, f"autoencoder_step_{step:06d}.npz")
        if jax.process_index() == 0:
            np.savez_compressed(npz, real=real[: len(rec)], reconstructed=rec, prior=prior)
        logging.info("Wrote %s, %s and %s.", rec_path, prior_path, npz)
        return {
            "step": step,
            "grid": prior_path,
            "reconstructions": rec_path,
            "npz": npz,
            "samples": prior,
            "real": real[: len(rec)],
            "reconstructed": rec,
        }

    def latent_scale(self, params) -> float:
        """LDM's scale factor 1 / std(z) of posterior samples z ~ q(z | x) of the first
        autoencoder.scale_num_examples training images (one draw each, a fixed key)."""
        c = self.config
        imgs = self.load_train_split()[0][: c.autoencoder.scale_num_examples]
        moments = predict_in_batches(
            functools.partial(self._encode, params), imgs, c.eval.batch_size
        )
        mean, logvar = np.split(moments, 2, axis=-1)
        key = jax.random.fold_in(jax.random.PRNGKey(c.seed), 3)
        z = latent.sample_posterior(key, jnp.asarray(mean), jnp.asarray(logvar))
        return float(latent.latent_scale_factor(z))

    def export(self, params, workdir: str) -> str:
        """DIR/hf_vae: diffusers' AutoencoderKL folder of the EMA weights, scaling_factor
        estimated on training data."""
        params = jax.device_get(params)
        scale = self.latent_scale(params)
        config = dataclasses.replace(self.ae_config, scaling_factor=scale)
        path = os.path.join(workdir, "hf_vae")
        save_autoencoder_kl(path, config, params["autoencoder"])
        logging.info(
            "Wrote the autoencoder (EMA weights, diffusers layout, scaling_factor %.5f) to %s.",
            scale,
            path,
        )
        return path
