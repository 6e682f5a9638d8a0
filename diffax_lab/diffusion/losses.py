"""Training losses: prediction targets and their weightings over time.

``get_loss_fn`` returns a pure function ``loss_fn(model_fn, x0, key) -> (loss, aux)`` where
``model_fn(x_t, t) -> prediction`` is any network already bound to its parameters and
condition, and ``t`` is continuous time in (0, 1] (see ``schedules.py``).

Weightings, written as the weight on the MSE in the prediction's own space:
- ``uniform``: L_simple of Ho et al. (2020), weight 1.
- ``min_snr``: Hang et al. (2023), x0-space weight min(SNR, gamma); divided by SNR for eps
  prediction and by SNR + 1 for v prediction.
- ``elbo``: the weight that turns the loss into the variational bound's sum
  L_0 + sum_{t>=2} L_{t-1} per dimension (nats, without L_T and Gaussian constants):
  x0-space weight T (SNR_{t-1} - SNR_t) / 2 for t >= 2 (posterior variance beta_tilde) and
  T / (2 beta_1) for the decoder term at t = 1 (variance beta_1).

``get_ve_loss_fn`` is denoising score matching for the VE SDE (NCSN / NCSN++, Song & Ermon
2019; Song et al. 2021): a sigma-conditioned score network, sigma from NCSN's geometric
levels or the continuous sigma(t). EDM's loss is ``edm.get_loss_fn``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from diffax_lab.diffusion import process
from diffax_lab.diffusion.schedules import DiscreteSchedule
from diffax_lab.diffusion.sde import VESDE

WEIGHTINGS = ("uniform", "min_snr", "elbo")


def x0_space_weights(schedule: DiscreteSchedule, weighting: str, min_snr_gamma: float = 5.0):
    """Per-step weight [T] on ||x0 - x0_hat||^2 (mean over dimensions)."""
    snr = schedule.snr
    if weighting == "min_snr":
        return jnp.minimum(snr, min_snr_gamma)
    if weighting == "elbo":
        T = schedule.num_steps
        snr_prev = jnp.concatenate([jnp.full((1,), jnp.inf), snr[:-1]])
        w = 0.5 * (snr_prev - snr)
        w = w.at[0].set(0.5 / schedule.betas[0])
        return T * w
    if weighting == "uniform":
        return None
    raise ValueError(f"diffusion.loss_weighting must be one of {WEIGHTINGS}, got {weighting!r}.")


def prediction_space_weights(
    schedule: DiscreteSchedule, prediction: str, weighting: str, min_snr_gamma: float = 5.0
):
    """Per-step weight [T] on the MSE in the prediction's own space."""
    w_x0 = x0_space_weights(schedule, weighting, min_snr_gamma)
    if w_x0 is None:
        return jnp.ones_like(schedule.betas)
    snr = schedule.snr
    # ||eps - eps_hat||^2 = SNR ||x0 - x0_hat||^2 and ||v - v_hat||^2 = (1 + SNR) ||x0 - x0_hat||^2.
    if prediction == "eps":
        return w_x0 / snr
    if prediction == "v":
        return w_x0 / (1.0 + snr)
    if prediction == "x0":
        return w_x0
    raise ValueError(
        f"diffusion.prediction must be one of {process.PREDICTIONS}, got {prediction!r}."
    )


def get_loss_fn(
    schedule: DiscreteSchedule,
    prediction: str = "eps",
    weighting: str = "uniform",
    min_snr_gamma: float = 5.0,
):
    """Builds the denoising loss for the given schedule, target and weighting."""
    weights = prediction_space_weights(schedule, prediction, weighting, min_snr_gamma)
    T = schedule.num_steps

    def loss_fn(model_fn, x0, key):
        t_key, noise_key = jax.random.split(key)
        batch = x0.shape[0]
        step = jax.random.randint(t_key, (batch,), 0, T)  # [B], uniform over steps
        noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
        alpha_bar = schedule.alphas_cumprod[step]
        x_t = process.q_sample(x0, alpha_bar, noise)
        output = model_fn(x_t, schedule.times[step]).astype(jnp.float32)
        target = process.target_for(prediction, x0, noise, alpha_bar)
        mse = jnp.mean(jnp.square(output - target), axis=tuple(range(1, x0.ndim)))  # [B]
        loss = jnp.mean(weights[step] * mse)
        aux = {"mse": jnp.mean(mse)}
        # Unweighted MSE per quarter of the time range: where the model is still poor.
        # NaN when the batch drew no step in that quarter (average these with nanmean).
        quarter = jnp.minimum(4 * step // T, 3)
        for q in range(4):
            in_q = quarter == q
            total = jnp.sum(jnp.where(in_q, mse, 0.0))
            aux[f"mse_q{q}"] = jnp.where(jnp.any(in_q), total / jnp.sum(in_q), jnp.nan)
        return loss, aux

    return loss_fn


def get_ve_loss_fn(
    sde: VESDE,
    num_scales: int | None = None,
    likelihood_weighting: bool = False,
    scale_by_sigma: bool = True,
    eps: float = 1e-5,
):
    """Denoising score matching for the VE SDE: ``loss_fn(model_fn, x0, key) -> (loss, aux)``
    with ``model_fn(x, sigma) -> output`` a sigma-conditioned network [B] (the score is
    output / sigma when ``scale_by_sigma``, as NCSN++ does).

    sigma is one of ``num_scales`` geometric levels from sigma_min to sigma_max, uniformly
    (NCSN, Song & Ermon 2019, eq. 5), or with ``num_scales=None`` sigma(t) at t ~ U(eps, 1)
    (Song et al. 2021, eq. 7). The target is the score of the kernel, -z / sigma, and the
    per-example loss is the squared error averaged over dimensions, weighted by sigma^2
    (NCSN's lambda) or, with ``likelihood_weighting``, by g(t)^2 = 2 sigma^2 log(sigma_max /
    sigma_min) (Song et al. 2021b, a bound on the negative log-likelihood; continuous only).
    aux: ``dsm``, the sigma^2-weighted loss, whatever the weighting.
    """
    if not isinstance(sde, VESDE):
        raise ValueError(f"get_ve_loss_fn needs a VESDE (diffusion.sde='ve'), got {sde!r}.")
    if likelihood_weighting and num_scales is not None:
        raise ValueError(
            "diffusion.likelihood_weighting needs continuous noise levels "
            "(diffusion.num_scales=None)."
        )
    sigmas = None if num_scales is None else jnp.asarray(sde.discrete_sigmas(num_scales))
    g2_over_sigma2 = 2.0 * math.log(sde.sigma_max / sde.sigma_min)

    def loss_fn(model_fn, x0, key):
        level_key, noise_key = jax.random.split(key)
        batch = x0.shape[0]
        if sigmas is None:
            t = jax.random.uniform(level_key, (batch,), minval=eps, maxval=sde.T)
            sigma = sde.sigma(t)  # [B]
        else:
            sigma = sigmas[jax.random.randint(level_key, (batch,), 0, num_scales)]
        noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
        sig = process.expand_to(sigma, x0)
        out = model_fn(x0 + sig * noise, sigma).astype(jnp.float32)
        score = out / sig if scale_by_sigma else out
        sq = jnp.mean(jnp.square(score + noise / sig).reshape(batch, -1), axis=-1)  # [B]
        dsm = jnp.square(sigma) * sq
        per_example = g2_over_sigma2 * dsm if likelihood_weighting else dsm
        return jnp.mean(per_example), {"dsm": jnp.mean(dsm)}

    return loss_fn
