"""Exact optimal predictors for data whose noised marginals are known in closed form.

For data x_0 ~ sum_k pi_k N(mu_k, s_k^2 I), the noised x_t = sqrt(abar) x_0 + sqrt(1-abar) eps
is again a mixture, with components N(sqrt(abar) mu_k, (abar s_k^2 + 1 - abar) I), and the
MMSE noise predictor is E[eps | x_t] = sum_k r_k(x_t) sqrt(1 - abar) (x_t - sqrt(abar) mu_k)
/ (abar s_k^2 + 1 - abar), with r_k the posterior responsibility of component k.

These predictors let tests check samplers, guidance and likelihoods without training. The
second half gives scores, posterior means and log-densities for any marginal
x_t = scale x_0 + std eps (the SDEs of ``sde.py``), and a full-covariance Gaussian.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffax_lab.diffusion.schedules import DiscreteSchedule


def mixture_log_responsibilities(x_t, alpha_bar, means, stds, weights):
    """log r_k(x_t) [B, K] for the noised mixture; x_t [B, D], alpha_bar [B]."""
    ab = alpha_bar[:, None]  # [B, 1]
    var = ab * jnp.square(stds)[None, :] + (1.0 - ab)  # [B, K]
    diff = x_t[:, None, :] - jnp.sqrt(ab)[..., None] * means[None, :, :]  # [B, K, D]
    dim = x_t.shape[-1]
    log_pdf = -0.5 * jnp.sum(jnp.square(diff), -1) / var - 0.5 * dim * jnp.log(2 * jnp.pi * var)
    logits = jnp.log(weights)[None, :] + log_pdf
    return logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)


def mixture_eps(x_t, alpha_bar, means, stds, weights):
    """E[eps | x_t] for the Gaussian mixture; x_t [B, D], alpha_bar [B]."""
    ab = alpha_bar[:, None]
    var = ab * jnp.square(stds)[None, :] + (1.0 - ab)  # [B, K]
    diff = x_t[:, None, :] - jnp.sqrt(ab)[..., None] * means[None, :, :]  # [B, K, D]
    resp = jnp.exp(mixture_log_responsibilities(x_t, alpha_bar, means, stds, weights))
    per_k = jnp.sqrt(1.0 - ab)[..., None] * diff / var[..., None]
    return jnp.sum(resp[..., None] * per_k, axis=1)


def gaussian_mixture_model_fn(schedule: DiscreteSchedule, means, stds, weights):
    """model_fn(x_t, t) -> eps for the mixture, with t the continuous time (samplers' API)."""
    means = jnp.asarray(means, jnp.float32)
    stds = jnp.asarray(stds, jnp.float32)
    weights = jnp.asarray(weights, jnp.float32)

    def model_fn(x_t, t):
        return mixture_eps(x_t, schedule.alpha_bar_at(t), means, stds, weights)

    return model_fn


def gaussian_model_fn(schedule: DiscreteSchedule, mean, std):
    """model_fn for a single Gaussian N(mean, std^2 I) (a one-component mixture)."""
    return gaussian_mixture_model_fn(schedule, jnp.asarray(mean)[None], jnp.asarray([std]), [1.0])


# ---------------------------------------------------------------- any Gaussian marginal
# For an SDE whose marginal is x_t = scale x_0 + std eps (sde.py), component k is noised to
# N(scale mu_k, (scale^2 s_k^2 + std^2) I): the VP, sub-VP and VE SDEs alike. Written in
# (scale, std) directly, so tiny std (sub-VP near t = 0) keeps its precision.


def _noised_components(x, scale, std, means, stds, weights):
    """(log responsibilities [B, K], variances [B, K], x - scale mu_k [B, K, D])."""
    var = jnp.square(scale)[:, None] * jnp.square(stds)[None] + jnp.square(std)[:, None]
    diff = x[:, None, :] - scale[:, None, None] * means[None]
    dim = x.shape[-1]
    log_pdf = -0.5 * jnp.sum(jnp.square(diff), -1) / var - 0.5 * dim * jnp.log(2 * jnp.pi * var)
    logits = jnp.log(weights)[None] + log_pdf
    return logits, var, diff


def mixture_score(x, scale, std, means, stds, weights):
    """grad_x log p_t(x) [B, D] = -sum_k r_k(x) (x - scale mu_k) / (scale^2 s_k^2 + std^2)."""
    logits, var, diff = _noised_components(x, scale, std, means, stds, weights)
    resp = jax.nn.softmax(logits, axis=-1)
    return -jnp.sum((resp / var)[..., None] * diff, axis=1)


def mixture_posterior_mean(x, scale, std, means, stds, weights):
    """E[x_0 | x_t] [B, D], from each component's Gaussian posterior (not through the score):
    E[x_0 | x_t, k] = mu_k + scale s_k^2 / (scale^2 s_k^2 + std^2) (x_t - scale mu_k)."""
    logits, var, diff = _noised_components(x, scale, std, means, stds, weights)
    resp = jax.nn.softmax(logits, axis=-1)  # [B, K]
    gain = scale[:, None] * jnp.square(stds)[None] / var  # [B, K]
    per_k = means[None] + gain[..., None] * diff
    return jnp.sum(resp[..., None] * per_k, axis=1)


def mixture_log_prob(x, scale, std, means, stds, weights):
    """log p_t(x) [B] of the noised mixture."""
    logits, _, _ = _noised_components(x, scale, std, means, stds, weights)
    return jax.nn.logsumexp(logits, axis=-1)


def mixture_score_fn(sde, means, stds, weights):
    """score_fn(x, t) of the mixture under ``sde`` (sde.py's score API)."""
    means = jnp.asarray(means, jnp.float32)
    stds = jnp.asarray(stds, jnp.float32)
    weights = jnp.asarray(weights, jnp.float32)

    def score_fn(x, t):
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
        return mixture_score(x, *sde.marginal_coeffs(t), means, stds, weights)

    return score_fn


def gaussian_score_fn(sde, mean, cov):
    """score_fn(x, t) for data N(mean, cov) with a full covariance [D, D]:
    -(scale^2 cov + std^2 I)^{-1} (x - scale mean)."""
    mean = jnp.asarray(mean, jnp.float32)
    cov = jnp.asarray(cov, jnp.float32)
    eye = jnp.eye(cov.shape[0], dtype=jnp.float32)

    def score_fn(x, t):
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
        scale, std = sde.marginal_coeffs(t)
        cov_t = jnp.square(scale)[:, None, None] * cov + jnp.square(std)[:, None, None] * eye
        diff = x - scale[:, None] * mean
        return -jnp.linalg.solve(cov_t, diff[..., None])[..., 0]

    return score_fn


def gaussian_log_prob(x, scale, std, mean, cov):
    """log N(x; scale mean, scale^2 cov + std^2 I) [B], in float64 numpy."""
    x = np.asarray(x, np.float64)
    scale = np.asarray(scale, np.float64)[:, None, None]
    std = np.asarray(std, np.float64)[:, None, None]
    cov = np.asarray(cov, np.float64)
    cov_t = scale**2 * cov + std**2 * np.eye(cov.shape[0])
    diff = x - scale[:, :, 0] * np.asarray(mean, np.float64)
    _, logdet = np.linalg.slogdet(cov_t)
    maha = np.einsum("bi,bi->b", diff, np.linalg.solve(cov_t, diff[..., None])[..., 0])
    return -0.5 * (maha + logdet + cov.shape[0] * np.log(2 * np.pi))
