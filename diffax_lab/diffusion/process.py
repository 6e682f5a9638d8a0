"""The forward process q(x_t | x_0), its posterior, and conversions between predictions.

Every function takes ``alpha_bar`` (broadcastable against x) rather than a step index, so
the same code serves the training loss, any respaced sampler and continuous-time views.

Not for: schedules (``schedules.py``) or networks.
"""

from __future__ import annotations

import jax.numpy as jnp

PREDICTIONS = ("eps", "x0", "v")


def expand_to(a, x):
    """Reshapes a per-example array [B] to broadcast against x [B, ...]."""
    a = jnp.asarray(a)
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def q_sample(x0, alpha_bar, noise):
    """x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps (DDPM eq. 4)."""
    alpha_bar = expand_to(alpha_bar, x0)
    return jnp.sqrt(alpha_bar) * x0 + jnp.sqrt(1.0 - alpha_bar) * noise


def predict_x0_from_eps(x_t, eps, alpha_bar):
    alpha_bar = expand_to(alpha_bar, x_t)
    return (x_t - jnp.sqrt(1.0 - alpha_bar) * eps) / jnp.sqrt(alpha_bar)


def predict_eps_from_x0(x_t, x0, alpha_bar):
    alpha_bar = expand_to(alpha_bar, x_t)
    return (x_t - jnp.sqrt(alpha_bar) * x0) / jnp.sqrt(1.0 - alpha_bar)


def v_from_eps_x0(eps, x0, alpha_bar):
    """v = sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans & Ho 2022, section 4)."""
    alpha_bar = expand_to(alpha_bar, x0)
    return jnp.sqrt(alpha_bar) * eps - jnp.sqrt(1.0 - alpha_bar) * x0


def predict_x0_from_v(x_t, v, alpha_bar):
    alpha_bar = expand_to(alpha_bar, x_t)
    return jnp.sqrt(alpha_bar) * x_t - jnp.sqrt(1.0 - alpha_bar) * v


def predict_eps_from_v(x_t, v, alpha_bar):
    alpha_bar = expand_to(alpha_bar, x_t)
    return jnp.sqrt(1.0 - alpha_bar) * x_t + jnp.sqrt(alpha_bar) * v


def to_x0_and_eps(prediction: str, output, x_t, alpha_bar):
    """Converts a network output of type ``prediction`` to (x0_hat, eps_hat)."""
    if prediction == "eps":
        return predict_x0_from_eps(x_t, output, alpha_bar), output
    if prediction == "x0":
        return output, predict_eps_from_x0(x_t, output, alpha_bar)
    if prediction == "v":
        return predict_x0_from_v(x_t, output, alpha_bar), predict_eps_from_v(x_t, output, alpha_bar)
    raise ValueError(f"diffusion.prediction must be one of {PREDICTIONS}, got {prediction!r}.")


def target_for(prediction: str, x0, eps, alpha_bar):
    """The regression target of a network that predicts ``prediction``."""
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return v_from_eps_x0(eps, x0, alpha_bar)
    raise ValueError(f"diffusion.prediction must be one of {PREDICTIONS}, got {prediction!r}.")


def q_posterior_mean_variance(x0, x_t, alpha_bar, alpha_bar_prev):
    """Mean and variance of q(x_s | x_t, x_0) for s < t (DDPM eqs. 6-7, any pair of steps).

    With alpha_t = abar_t / abar_s and beta_t = 1 - alpha_t:
    mean = sqrt(abar_s) beta_t / (1 - abar_t) x_0 + sqrt(alpha_t) (1 - abar_s) / (1 - abar_t) x_t,
    var = beta_t (1 - abar_s) / (1 - abar_t).
    """
    ab_t = expand_to(alpha_bar, x_t)
    ab_s = expand_to(alpha_bar_prev, x_t)
    alpha = ab_t / ab_s
    beta = 1.0 - alpha
    coef_x0 = jnp.sqrt(ab_s) * beta / (1.0 - ab_t)
    coef_xt = jnp.sqrt(alpha) * (1.0 - ab_s) / (1.0 - ab_t)
    mean = coef_x0 * x0 + coef_xt * x_t
    var = beta * (1.0 - ab_s) / (1.0 - ab_t)
    return mean, var
