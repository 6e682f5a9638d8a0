"""Negative log-likelihood in bits/dim from DDPM's discrete-time variational bound
(Ho et al. 2020, eq. 5; the terms of their code and of improved-diffusion):

    L = L_T + sum_{t=2..T} L_{t-1} + L_0,
    L_T     = KL(q(x_T | x_0) || N(0, I)),
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)),
    L_0     = -log p(x_0 | x_1), the discretised Gaussian decoder over the 256 levels of
              8-bit data scaled to [-1, 1] (bins of width 2/255).

The reverse variance is fixed: ``beta_tilde`` (posterior variance, clipped at t = 1 as in
DDPM's code) or ``beta`` (with the t = 1 entry set to beta_tilde_2). Each term is
averaged over dimensions and divided by ln 2, so their sum is bits/dim of the 8-bit data.
``bits_per_dim`` evaluates all T terms, or n of them by stratified sampling (L_0 always,
then one step drawn per image from each of n - 1 blocks of the other steps, weighted by
the block's size): an unbiased estimate whose term count the report must state.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import log_ndtr, ndtr

from diffax_lab.diffusion import process
from diffax_lab.diffusion.schedules import DiscreteSchedule

VARIANCES = ("beta_tilde", "beta")


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + jnp.exp(logvar1 - logvar2)
        + jnp.square(mean1 - mean2) * jnp.exp(-logvar2)
    )


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log P(x) of 8-bit data x in [-1, 1] under N(mean, e^(2 log_scale)) integrated over
    each value's bin of width 2/255; the edge bins extend to -inf and +inf."""
    inv_std = jnp.exp(-log_scale)
    centred = x - mean
    upper = inv_std * (centred + 1.0 / 255.0)
    lower = inv_std * (centred - 1.0 / 255.0)
    log_cdf_upper = log_ndtr(upper)  # bin [-inf, x + 1/255] at the bottom edge
    log_sf_lower = log_ndtr(-lower)  # bin [x - 1/255, inf] at the top edge
    delta = jnp.where(lower > 0, ndtr(-lower) - ndtr(-upper), ndtr(upper) - ndtr(lower))
    log_delta = jnp.log(jnp.maximum(delta, 1e-12))
    return jnp.where(x < -0.999, log_cdf_upper, jnp.where(x > 0.999, log_sf_lower, log_delta))


def model_log_variances(schedule: DiscreteSchedule, variance: str):
    if variance == "beta_tilde":
        return schedule.posterior_log_variance_clipped
    if variance == "beta":
        pv = schedule.posterior_variance
        first = pv[1:2] if schedule.num_steps > 1 else schedule.betas[:1]
        return jnp.log(jnp.concatenate([first, schedule.betas[1:]]))
    raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}.")


def _mean_dims(x):
    return jnp.mean(x.reshape(x.shape[0], -1), axis=-1)


def prior_bpd(schedule: DiscreteSchedule, x0):
    """L_T in bits/dim: KL(q(x_T | x_0) || N(0, I)) [B]."""
    ab = schedule.alphas_cumprod[-1]
    kl = normal_kl(jnp.sqrt(ab) * x0, jnp.log1p(-ab), 0.0, 0.0)
    return _mean_dims(kl) / math.log(2.0)


def vlb_term(
    model_fn,
    schedule,
    x0,
    index,
    noise,
    prediction="eps",
    variance="beta_tilde",
    clip_x0=True,
    model_args=None,
):
    """The term of step ``index`` [B] (0-based, per image: 0 is L_0, i > 0 is L_i) in
    bits/dim, [B]. ``model_fn(x_t, t)``, or ``model_fn(x_t, t, model_args)`` when given."""
    ab = schedule.alphas_cumprod[index]
    ab_prev = schedule.alphas_cumprod_prev[index]
    x_t = process.q_sample(x0, ab, noise)
    t = schedule.times[index]
    out = model_fn(x_t, t) if model_args is None else model_fn(x_t, t, model_args)
    x0_hat, _ = process.to_x0_and_eps(prediction, out.astype(jnp.float32), x_t, ab)
    if clip_x0:
        x0_hat = jnp.clip(x0_hat, -1.0, 1.0)
    model_mean, _ = process.q_posterior_mean_variance(x0_hat, x_t, ab, ab_prev)
    model_logvar = process.expand_to(model_log_variances(schedule, variance)[index], x0)
    true_mean, true_var = process.q_posterior_mean_variance(x0, x_t, ab, ab_prev)
    kl = normal_kl(true_mean, jnp.log(jnp.maximum(true_var, 1e-20)), model_mean, model_logvar)
    nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar)
    return jnp.where(index == 0, _mean_dims(nll), _mean_dims(kl)) / math.log(2.0)


def strata(num_timesteps: int, num_terms: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(starts, sizes) of the blocks of steps one term each stands for: [0] alone (L_0),
    then steps 1..T-1 cut into num_terms - 1 near-equal blocks (all T blocks of 1 if
    num_terms is 0/None or >= T)."""
    T = num_timesteps
    if not num_terms or num_terms >= T:
        return np.arange(T), np.ones(T, np.int64)
    if num_terms < 2:
        raise ValueError("bits_per_dim needs num_terms >= 2 (L_0 and one more) or 0 (all).")
    edges = np.round(np.linspace(1, T, num_terms)).astype(np.int64)
    return np.concatenate([[0], edges[:-1]]), np.concatenate([[1], np.diff(edges)])


@functools.partial(
    jax.jit, static_argnames=("model_fn", "prediction", "variance", "clip_x0", "num_terms")
)
def vlb_terms(
    model_fn,
    schedule,
    x0,
    key,
    prediction="eps",
    variance="beta_tilde",
    clip_x0=True,
    num_terms=None,
    model_args=None,
):
    """(prior [B], terms [B, n], weights [n]) in bits/dim for images x0 in [-1, 1].

    Term j is evaluated at a step drawn uniformly, per image, from block j of ``strata``
    and weighted by the block's size: stratified sampling, an unbiased estimate of the
    sum over all T steps (exact when every block is one step).
    """
    starts, sizes = strata(schedule.num_steps, num_terms)
    b = x0.shape[0]

    def one(carry, block):
        j, start, size = block
        k_step, k_noise = jax.random.split(jax.random.fold_in(key, j))
        index = start + jax.random.randint(k_step, (b,), 0, size)
        noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
        term = vlb_term(
            model_fn, schedule, x0, index, noise, prediction, variance, clip_x0, model_args
        )
        return carry, term

    blocks = (jnp.arange(len(starts)), jnp.asarray(starts), jnp.asarray(sizes))
    _, terms = jax.lax.scan(one, None, blocks)
    return prior_bpd(schedule, x0), terms.T, jnp.asarray(sizes, jnp.float32)


def bits_per_dim(
    model_fn,
    schedule,
    x0,
    key,
    prediction="eps",
    variance="beta_tilde",
    clip_x0=True,
    num_terms=None,
    model_args=None,
):
    """Per-image bits/dim [B] (numpy): L_T + sum of L_{t-1} + L_0, over all T terms or
    estimated from ``num_terms`` stratified ones (see ``vlb_terms``). ``model_fn`` is a
    static (hashed) argument: pass what changes between calls (parameters, labels) as
    ``model_args``, so one compiled program serves every batch."""
    prior, terms, weights = vlb_terms(
        model_fn, schedule, x0, key, prediction, variance, clip_x0, num_terms, model_args
    )
    terms = np.asarray(terms, np.float64) @ np.asarray(weights, np.float64)
    return np.asarray(prior, np.float64) + terms
