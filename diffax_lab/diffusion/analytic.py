"""Exact optimal predictors for data whose noised marginals are known in closed form.

For data x_0 ~ sum_k pi_k N(mu_k, s_k^2 I), the noised x_t = sqrt(abar) x_0 + sqrt(1-abar) eps
is again a mixture, with components N(sqrt(abar) mu_k, (abar s_k^2 + 1 - abar) I), and the
MMSE noise predictor is E[eps | x_t] = sum_k r_k(x_t) sqrt(1 - abar) (x_t - sqrt(abar) mu_k)
/ (abar s_k^2 + 1 - abar), with r_k the posterior responsibility of component k.

These predictors let tests check samplers, guidance and likelihoods without training.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

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
