"""EDM: Karras, Aittala, Aila & Laine (2022), "Elucidating the Design Space of
Diffusion-Based Generative Models". Data x_0 plus noise of level sigma, y = x_0 + sigma n.

- ``preconditioning``: c_skip, c_out, c_in, c_noise of Table 1 (derived in App. B.6), so the
  denoiser D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) wraps a raw network F;
- ``get_loss_fn``: sigma ~ exp(N(P_mean, P_std^2)) and the weight
  lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (Table 1), in the
  style of ``losses.get_loss_fn``;
- ``sample``: Algorithm 2 (the stochastic sampler with S_churn, S_tmin, S_tmax, S_noise;
  S_churn = 0 is Algorithm 1, the deterministic Heun sampler) on the rho = 7 grid (eq. 5,
  ``samplers.karras_sigmas``), in one ``lax.scan``; registered as the sampler ``edm``
  (``edm_run``) so that any task's network samples with it by name.

``net_fn(x_in, c_noise) -> F`` is the raw network bound to its parameters, with x_in [B, ...]
and c_noise [B]; ``denoiser(x, sigma) -> D`` is the preconditioned one. The lab's DDPM
networks become denoisers through ``denoiser_from_model`` (then the deterministic sampler is
``samplers.sample(sampler="heun")`` on the same grid), exact scores through
``denoiser_from_score``.

Not for: networks, or the VP/VE SDE samplers (``sde_samplers.py``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from diffax_lab.diffusion import process
from diffax_lab.diffusion.samplers import (
    KARRAS_RHO,
    SampleOutput,
    karras_sigmas,
    register_sampler,
)
from diffax_lab.diffusion.samplers import make_denoiser as make_schedule_denoiser
from diffax_lab.diffusion.schedules import DiscreteSchedule

# Table 1 / Section 5 defaults for CIFAR-10 and ImageNet-64.
SIGMA_DATA = 0.5
P_MEAN, P_STD = -1.2, 1.2
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def preconditioning(sigma, sigma_data: float = SIGMA_DATA):
    """(c_skip, c_out, c_in, c_noise) at sigma (Table 1; App. B.6 eqs. 114-117 derive them:
    c_in gives the network unit-variance inputs, c_skip minimises c_out, and c_out gives the
    effective training target (x_0 - c_skip y) / c_out unit variance)."""
    sigma = jnp.asarray(sigma, jnp.float32)
    s2, d2 = jnp.square(sigma), sigma_data**2
    c_skip = d2 / (s2 + d2)
    c_out = sigma * sigma_data / jnp.sqrt(s2 + d2)
    c_in = 1.0 / jnp.sqrt(s2 + d2)
    c_noise = 0.25 * jnp.log(sigma)
    return c_skip, c_out, c_in, c_noise


def loss_weight(sigma, sigma_data: float = SIGMA_DATA):
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out^2."""
    sigma = jnp.asarray(sigma, jnp.float32)
    return (jnp.square(sigma) + sigma_data**2) / jnp.square(sigma * sigma_data)


def make_denoiser(net_fn, sigma_data: float = SIGMA_DATA):
    """D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) (eq. 7), sigma [B]."""

    def denoiser(x, sigma):
        c_skip, c_out, c_in, c_noise = preconditioning(sigma, sigma_data)
        out = net_fn(process.expand_to(c_in, x) * x, c_noise).astype(jnp.float32)
        return process.expand_to(c_skip, x) * x + process.expand_to(c_out, x) * out

    return denoiser


def get_loss_fn(sigma_data: float = SIGMA_DATA, p_mean: float = P_MEAN, p_std: float = P_STD):
    """EDM's training loss ``loss_fn(net_fn, x0, key) -> (loss, aux)``.

    loss = E[lambda(sigma) ||D(x0 + sigma n; sigma) - x0||^2] with ln sigma ~ N(p_mean,
    p_std^2) (Table 1, eq. 8), the squared error averaged over dimensions. Since
    lambda c_out^2 = 1 this is the plain MSE between F and its effective target
    (x0 - c_skip y) / c_out. aux: ``mse`` (of D against x0, unweighted) and ``loss_q{0..3}``,
    the loss per quarter of the sigma distribution (NaN when the batch drew none there).
    """
    if not (sigma_data > 0 and p_std > 0):
        raise ValueError(
            f"diffusion.sigma_data and diffusion.p_std must be > 0, got {sigma_data}, {p_std}."
        )

    def loss_fn(net_fn, x0, key):
        k_sigma, k_noise = jax.random.split(key)
        batch = x0.shape[0]
        z = jax.random.normal(k_sigma, (batch,), jnp.float32)
        sigma = jnp.exp(p_mean + p_std * z)  # [B]
        noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
        y = x0 + process.expand_to(sigma, x0) * noise
        d = make_denoiser(net_fn, sigma_data)(y, sigma)
        sq = jnp.mean(jnp.square(d - x0).reshape(batch, -1), axis=-1)  # [B]
        per_example = loss_weight(sigma, sigma_data) * sq
        aux = {"mse": jnp.mean(sq)}
        quarter = jnp.clip(jnp.floor(4.0 * jax.scipy.stats.norm.cdf(z)), 0, 3)
        for q in range(4):
            in_q = quarter == q
            total = jnp.sum(jnp.where(in_q, per_example, 0.0))
            aux[f"loss_q{q}"] = jnp.where(jnp.any(in_q), total / jnp.sum(in_q), jnp.nan)
        return jnp.mean(per_example), aux

    return loss_fn


def denoiser_from_score(score_fn):
    """D(x, sigma) = x + sigma^2 score(x, sigma) (Tweedie; EDM eq. 3), with
    ``score_fn(x, sigma)`` the score of p(x; sigma), the data blurred by N(0, sigma^2 I)."""

    def denoiser(x, sigma):
        return x + process.expand_to(jnp.square(sigma), x) * score_fn(x, sigma)

    return denoiser


def denoiser_from_model(
    model_fn,
    schedule: DiscreteSchedule,
    prediction: str = "eps",
    clip_x0: float | None = None,
):
    """D(x, sigma) for a DDPM network ``model_fn(x_t, t)``: x is the VE state
    x_t / sqrt(abar) with abar = 1 / (1 + sigma^2) (EDM eq. 4 for VP), and the network is
    called at the schedule's time for that log-SNR (outside the schedule's sigma range the
    time is extrapolated, see ``DiscreteSchedule.time_at_log_snr``)."""
    return denoiser_from_schedule_denoiser(
        make_schedule_denoiser(model_fn, schedule, prediction, clip_x0), schedule
    )


def denoiser_from_schedule_denoiser(denoise, schedule: DiscreteSchedule):
    """D(x, sigma) from the samplers' ``denoise(x_t, t) -> (x0_hat, eps_hat)`` of VP states
    at the schedule's times (``samplers.make_denoiser``): x_t = x / sqrt(1 + sigma^2) at
    the time with log-SNR -2 log sigma."""

    def denoiser(x, sigma):
        alpha_bar = 1.0 / (1.0 + jnp.square(sigma))
        t = schedule.time_at_log_snr(-2.0 * jnp.log(sigma))
        x0_hat, _ = denoise(x * process.expand_to(jnp.sqrt(alpha_bar), x), t)
        return x0_hat

    return denoiser


def schedule_sigma_range(schedule: DiscreteSchedule) -> tuple[float, float]:
    """(sigma_min, sigma_max) of a schedule, sigma = sqrt((1 - abar) / abar) at its first and
    last step (the range of ``samplers.karras_grid``)."""
    ab = np.asarray(schedule.alphas_cumprod, np.float64)
    log_snr = np.log(ab) - np.log1p(-ab)
    return float(np.exp(-0.5 * log_snr[0])), float(np.exp(-0.5 * log_snr[-1]))


@register_sampler("edm", grid="run")
def edm_run(
    denoise,
    schedule: DiscreteSchedule,
    x_T,
    key,
    num_steps: int,
    *,
    S_churn: float = 0.0,
    S_tmin: float = 0.0,
    S_tmax: float = math.inf,
    S_noise: float = 1.0,
):
    """``sample`` (Algorithm 2; Algorithm 1, the deterministic Heun sampler, at S_churn = 0)
    as a sampler of the registry (``samplers.sample(sampler="edm")``, ``sample.sampler``):
    num_steps sigmas of the rho = 7 grid over the schedule's own sigma range
    (``schedule_sigma_range``), from the VP state x_T ~ N(0, I) scaled to the VE state
    x_T sqrt(1 + sigma_max^2). The options come from the sample section (sample.S_churn ...).
    """
    sigma_min, sigma_max = schedule_sigma_range(schedule)
    out = sample(
        denoiser_from_schedule_denoiser(denoise, schedule),
        x_T.shape,
        key,
        num_steps=num_steps,
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        S_churn=S_churn,
        S_tmin=S_tmin,
        S_tmax=S_tmax,
        S_noise=S_noise,
        x_T=x_T * math.sqrt(1.0 + sigma_max**2),
    )
    return out.samples, out.nfe


def sample(
    denoiser,
    shape,
    key,
    *,
    num_steps: int = 18,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = KARRAS_RHO,
    S_churn: float = 0.0,
    S_tmin: float = 0.0,
    S_tmax: float = math.inf,
    S_noise: float = 1.0,
    x_T=None,
) -> SampleOutput:
    """EDM Algorithm 2 (Algorithm 1 when S_churn = 0) from x ~ N(0, sigma_max^2 I).

    At each of the ``num_steps`` sigmas t_i (eq. 5, then t_N = 0): where S_tmin <= t_i <=
    S_tmax, raise the noise to t_hat = t_i (1 + gamma), gamma = min(S_churn / N, sqrt(2) - 1),
    by adding N(0, (t_hat^2 - t_i^2) S_noise^2); take an Euler step of dx/dsigma =
    (x - D(x; sigma)) / sigma to t_{i+1} and correct it with Heun's rule unless t_{i+1} = 0.
    nfe = 2 num_steps - 1. ``x_T`` is the initial VE state (already times sigma_max). Call
    inside ``jax.jit`` (with ``denoiser`` and the options static).
    """
    if S_churn < 0 or S_noise < 0:
        raise ValueError(f"sample.S_churn and S_noise must be >= 0, got {S_churn}, {S_noise}.")
    sigmas = np.concatenate([karras_sigmas(num_steps, sigma_min, sigma_max, rho), [0.0]])
    gamma = np.where(
        (sigmas[:-1] >= S_tmin) & (sigmas[:-1] <= S_tmax),
        min(S_churn / num_steps, math.sqrt(2.0) - 1.0),
        0.0,
    )
    batch = shape[0]
    init_key, loop_key = jax.random.split(key)
    x = sigma_max * jax.random.normal(init_key, shape, jnp.float32) if x_T is None else x_T
    sig = jnp.asarray(sigmas, jnp.float32)
    gam = jnp.asarray(gamma, jnp.float32)

    def body(x, i):
        s_cur, s_nxt = sig[i], sig[i + 1]
        s_hat = s_cur * (1.0 + gam[i])
        noise = jax.random.normal(jax.random.fold_in(loop_key, i), x.shape, x.dtype)
        # sqrt(t_hat^2 - t_i^2), written so that rounding cannot make it negative.
        x_hat = x + s_cur * jnp.sqrt(gam[i] * (2.0 + gam[i])) * S_noise * noise
        d = (x_hat - denoiser(x_hat, jnp.full((batch,), s_hat))) / s_hat
        x_euler = x_hat + (s_nxt - s_hat) * d

        def heun():  # Second-order correction, skipped (not evaluated) at sigma = 0.
            d2 = (x_euler - denoiser(x_euler, jnp.full((batch,), s_nxt))) / s_nxt
            return x_hat + (s_nxt - s_hat) * 0.5 * (d + d2)

        return jax.lax.cond(s_nxt > 0, heun, lambda: x_euler), None

    x, _ = jax.lax.scan(body, x, jnp.arange(num_steps))
    return SampleOutput(x, None, None, 2 * num_steps - 1)
