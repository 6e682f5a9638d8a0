"""The latent-space maths of latent diffusion (Rombach et al. 2022): the KL autoencoder's
objective and the scaling of its latents for the diffusion model. No networks: every function
takes arrays (or gradients) and returns arrays, so a task composes them with any encoder,
decoder and discriminator (``diffax_lab.models.vae``, ``diffax_lab.models.discriminator``).

The posterior is q(z | x) = N(mean, diag(exp(logvar))) per latent dimension, the prior
p(z) = N(0, I) (``AutoencoderKL.encode`` returns mean and the clamped logvar).

Autoencoder objective (LDM's ``LPIPSWithDiscriminator`` of taming-transformers, without the
LPIPS term), per example x with reconstruction x_hat, summed over dimensions and averaged over
the batch as LDM does, so ``kl_weight`` means what LDM's does (1e-6 in its configs):

    nll  = sum_pixels |x - x_hat| / exp(s) + s       (L1; L2 squares; s = output_logvar)
    kl   = KL(q(z | x) || N(0, I))                    (closed form, ``kl_to_standard_normal``)
    L_G  = nll + kl_weight * kl + lambda * disc_factor * (-mean D(x_hat))
    L_D  = disc_factor * hinge(D(x), D(x_hat))        (``discriminator_loss``)

with LDM's adaptive weight lambda = ||grad_w nll|| / (||grad_w L_adv|| + 1e-4), clipped to
[0, 1e4], times ``disc_weight`` and not differentiated, where w is the decoder's last layer
(``vae.LAST_LAYER``), and disc_factor zero before ``disc_start`` steps (taming's
``adopt_weight``). Inside a jitted step, take ``jax.grad`` of each loss with respect to the
whole parameter tree and pick the last-layer leaf: XLA drops the parts of the backward pass
that nothing uses.

Latent scaling (LDM sec. 4.3.2 and app. D.1; diffusers' ``scaling_factor``/``shift_factor``):
the diffusion model sees (z - shift) * scale, with scale = 1 / std(z) estimated on one batch
of encoded training images (``latent_scale_factor``), and the decoder gets z / scale + shift.

Evaluation helpers: PSNR of reconstructions, and the rate KL(q(z | x) || p(z)) in bits per data
dimension (the cost of the latent code, in the units of ``metrics.likelihood``'s bits/dim).

Not for: the diffusion loss in latent space (``losses.get_loss_fn`` on scaled latents) or the
networks themselves.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

RECONSTRUCTIONS = ("l1", "l2")
DISCRIMINATOR_LOSSES = ("hinge", "vanilla")


def _sum_per_example(x):
    """[B, ...] -> [B]."""
    return jnp.sum(x, axis=tuple(range(1, x.ndim)))


def kl_to_standard_normal(mean, logvar):
    """KL(N(mean, exp(logvar)) || N(0, I)) in nats, summed per example: [B, ...] -> [B].

    Per dimension 1/2 (mean^2 + sigma^2 - 1 - log sigma^2) (Kingma & Welling 2014, app. B),
    diffusers' ``DiagonalGaussianDistribution.kl()``.
    """
    mean = mean.astype(jnp.float32)
    logvar = logvar.astype(jnp.float32)
    return 0.5 * _sum_per_example(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)


def sample_posterior(key, mean, logvar):
    """z = mean + exp(logvar / 2) * eps, eps ~ N(0, I): the reparameterised sample."""
    eps = jax.random.normal(key, mean.shape, jnp.float32)
    return mean + jnp.exp(0.5 * logvar) * eps


def reconstruction_loss(x, x_rec, kind: str = "l1"):
    """sum over dimensions of |x - x_rec| (``l1``, LDM's) or (x - x_rec)^2 (``l2``): [B]."""
    diff = x_rec.astype(jnp.float32) - x.astype(jnp.float32)
    if kind == "l1":
        return _sum_per_example(jnp.abs(diff))
    if kind == "l2":
        return _sum_per_example(jnp.square(diff))
    raise ValueError(
        f"autoencoder reconstruction loss must be one of {RECONSTRUCTIONS}, got {kind!r}."
    )


def generator_adversarial_loss(logits_fake):
    """-mean D(x_hat): the decoder's adversarial loss (taming's g_loss)."""
    return -jnp.mean(logits_fake.astype(jnp.float32))


def autoencoder_loss(
    x,
    x_rec,
    mean,
    logvar,
    *,
    kl_weight: float,
    reconstruction: str = "l1",
    output_logvar=0.0,
    logits_fake=None,
    adversarial_weight=0.0,
):
    """The autoencoder's (generator's) loss L_G of the module docstring: (scalar, aux).

    ``output_logvar``: LDM's learned scalar s (a parameter of the loss; 0 gives the plain
    summed reconstruction error). ``logits_fake``: the discriminator on ``x_rec`` (None: no
    adversarial term); ``adversarial_weight``: lambda * disc_factor, computed by the caller
    (``adaptive_adversarial_weight``, ``discriminator_factor``) and not differentiated here.
    With ``kl_weight=0`` and no discriminator this is a plain autoencoder's loss.
    aux: per-batch means of ``reconstruction`` (summed error), ``nll``, ``kl`` and
    ``adversarial`` (-mean D(x_hat), 0 without a discriminator).
    """
    rec = reconstruction_loss(x, x_rec, reconstruction)  # [B]
    num_dims = math.prod(x.shape[1:])
    # LDM: rec / exp(s) + s per pixel, then summed.
    nll = rec * jnp.exp(-output_logvar) + num_dims * output_logvar
    kl = kl_to_standard_normal(mean, logvar)
    loss = jnp.mean(nll) + kl_weight * jnp.mean(kl)
    adv = jnp.zeros((), jnp.float32)
    if logits_fake is not None:
        adv = generator_adversarial_loss(logits_fake)
        loss = loss + jax.lax.stop_gradient(adversarial_weight) * adv
    aux = {
        "reconstruction": jnp.mean(rec),
        "nll": jnp.mean(nll),
        "kl": jnp.mean(kl),
        "adversarial": adv,
    }
    return loss, aux


def discriminator_loss(logits_real, logits_fake, kind: str = "hinge"):
    """The discriminator's loss (taming's ``hinge_d_loss`` / ``vanilla_d_loss``), a scalar:
    hinge: 1/2 (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)));
    vanilla: 1/2 (mean softplus(-D(x)) + mean softplus(D(x_hat)))."""
    real = logits_real.astype(jnp.float32)
    fake = logits_fake.astype(jnp.float32)
    if kind == "hinge":
        return 0.5 * (jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake)))
    if kind == "vanilla":
        return 0.5 * (jnp.mean(jax.nn.softplus(-real)) + jnp.mean(jax.nn.softplus(fake)))
    raise ValueError(f"discriminator loss must be one of {DISCRIMINATOR_LOSSES}, got {kind!r}.")


def discriminator_factor(step, disc_start: int, factor: float = 1.0):
    """``factor`` from step ``disc_start`` on, 0 before (taming's ``adopt_weight``)."""
    return jnp.where(jnp.asarray(step) >= disc_start, factor, 0.0).astype(jnp.float32)


def adaptive_adversarial_weight(
    nll_grad, adversarial_grad, *, disc_weight: float = 1.0, max_weight: float = 1e4, eps=1e-4
):
    """LDM's lambda: ||grad nll|| / (||grad L_adv|| + eps), clipped to [0, max_weight], times
    ``disc_weight``; gradients taken with respect to the decoder's last layer
    (taming's ``calculate_adaptive_weight``). Not differentiated."""
    nll_norm = jnp.sqrt(jnp.sum(jnp.square(nll_grad.astype(jnp.float32))))
    adv_norm = jnp.sqrt(jnp.sum(jnp.square(adversarial_grad.astype(jnp.float32))))
    weight = jnp.clip(nll_norm / (adv_norm + eps), 0.0, max_weight)
    return jax.lax.stop_gradient(weight) * disc_weight


def latent_scale_factor(latents):
    """1 / std of all entries of a batch of latents (LDM's ``1. / z.flatten().std()``, with
    PyTorch's unbiased std): the scale that gives the diffusion model unit-variance inputs."""
    z = jnp.ravel(latents).astype(jnp.float32)
    return 1.0 / jnp.std(z, ddof=1)


def scale_latents(z, scale_factor, shift_factor=0.0):
    """Autoencoder latents -> diffusion-model inputs: (z - shift) * scale (diffusers')."""
    return (z - shift_factor) * scale_factor


def unscale_latents(z_scaled, scale_factor, shift_factor=0.0):
    """Diffusion-model outputs -> decoder inputs: z / scale + shift."""
    return z_scaled / scale_factor + shift_factor


def psnr(x, x_rec, data_range: float = 2.0):
    """Peak signal-to-noise ratio per example in dB, 10 log10(range^2 / MSE): [B].
    ``data_range`` = max - min of the data: 2 for images in [-1, 1], 255 for uint8."""
    diff = x_rec.astype(jnp.float32) - x.astype(jnp.float32)
    mse = jnp.mean(jnp.square(diff), axis=tuple(range(1, x.ndim)))
    return 10.0 * jnp.log10(data_range**2 / mse)


def rate_bits_per_dim(mean, logvar, num_data_dims: int):
    """The rate KL(q(z | x) || N(0, I)) in bits per data dimension (H W C of the image): [B]."""
    return kl_to_standard_normal(mean, logvar) / (num_data_dims * math.log(2.0))
