"""Metrics against closed forms: FD, KID, precision/recall, and bits/dim of a Gaussian."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax_lab.diffusion import get_schedule
from diffax_lab.diffusion.analytic import gaussian_model_fn
from diffax_lab.metrics import (
    bits_per_dim,
    feature_statistics,
    frechet_distance,
    kernel_distance,
    precision_recall,
)
from diffax_lab.metrics.likelihood import discretized_gaussian_log_likelihood


def gaussian_features(seed, n, mean, cov):
    rng = np.random.default_rng(seed)
    return rng.multivariate_normal(mean, cov, size=n).astype(np.float32)


def test_fd_of_a_set_with_itself_is_zero():
    x = gaussian_features(0, 2000, np.zeros(8), np.eye(8))
    mu, s = feature_statistics(x)
    assert frechet_distance(mu, s, mu, s) < 1e-6


def test_fd_matches_the_closed_form():
    # Exact statistics: diagonal covariances give |dm|^2 + sum (sqrt(a) - sqrt(b))^2.
    m1, m2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    # A general pair (non-commuting covariances): against the eigen-decomposition of
    # S1 S2 itself, a different route to Tr (S1 S2)^(1/2).
    rng = np.random.default_rng(1)
    p, q = rng.standard_normal((4, 4)), rng.standard_normal((4, 4))
    s1, s2 = p @ p.T + 0.1 * np.eye(4), q @ q.T + 0.1 * np.eye(4)
    tr_sqrt = np.sum(np.sqrt(np.linalg.eigvals(s1 @ s2).real))
    closed = np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(np.zeros(4), s1, np.zeros(4), s2) == pytest.approx(closed, rel=1e-7)
    # And from samples: the estimate converges to the closed form.
    x = gaussian_features(2, 20000, np.zeros(4), s1)
    y = gaussian_features(3, 20000, np.ones(4), s2)
    est = frechet_distance(*feature_statistics(x), *feature_statistics(y))
    assert est == pytest.approx(closed + 4.0, rel=0.05)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_shifted():
    x = gaussian_features(0, 1000, np.zeros(16), np.eye(16))
    y = gaussian_features(1, 1000, np.zeros(16), np.eye(16))
    z = gaussian_features(2, 1000, np.full(16, 0.5), np.eye(16))
    same, same_std = kernel_distance(x, y, num_subsets=20, subset_size=500)
    shifted, _ = kernel_distance(x, z, num_subsets=20, subset_size=500)
    assert abs(same) < 3 * same_std + 1e-3
    assert shifted > 0.05 and shifted > 20 * abs(same)


def test_precision_recall_identical_sets_and_shifted():
    x = gaussian_features(0, 1000, np.zeros(4), np.eye(4))
    assert precision_recall(x, x) == (1.0, 1.0)
    far = x + 3.0  # half the mass outside the other manifold, each way
    p, r = precision_recall(x, far)
    assert p < 0.5 and r < 0.5
    # A generator that only covers a narrow part of the data: precise, poor recall.
    narrow = 0.3 * gaussian_features(1, 1000, np.zeros(4), np.eye(4))
    p, r = precision_recall(x, narrow)
    assert p > 0.9 and r < 0.6


def test_discretised_decoder_is_a_distribution_over_the_256_levels():
    levels = jnp.linspace(-1.0, 1.0, 256)
    for mean, log_scale in ((0.0, -3.0), (0.9, -1.0), (-1.0, -6.0)):
        logp = discretized_gaussian_log_likelihood(levels, mean, log_scale)
        assert float(jnp.sum(jnp.exp(logp))) == pytest.approx(1.0, abs=1e-4)


def analytic_gaussian_bound(schedule, s: float) -> float:
    """The bound in bits/dim for data N(0, s^2) per dimension and its exact predictor, in
    closed form: E KL_t = (coef_x0^2 mmse_t / var_p + var_q / var_p - 1 + ln(var_p / var_q))
    / 2 with mmse_t = Var(x_0 | x_t) = s^2 (1 - abar) / (abar s^2 + 1 - abar); the decoder's
    E[-ln P(bin of width 2/255 around x_0)] by Gauss-Hermite quadrature over the error
    x_0 - x0_hat ~ N(0, mmse_1); the prior KL in closed form."""
    ab = np.asarray(schedule.alphas_cumprod, np.float64)
    abp = np.concatenate([[1.0], ab[:-1]])
    beta = 1 - ab / abp
    var_q = beta * (1 - abp) / (1 - ab)
    var_p = np.concatenate([var_q[1:2], var_q[1:]])  # beta_tilde, clipped at t = 1
    mmse = s * s * (1 - ab) / (ab * s * s + 1 - ab)
    coef = np.sqrt(abp) * beta / (1 - ab)
    kl = 0.5 * (
        coef[1:] ** 2 * mmse[1:] / var_p[1:]
        + var_q[1:] / var_p[1:]
        - 1
        + np.log(var_p[1:] / var_q[1:])
    )
    z, w = np.polynomial.hermite_e.hermegauss(40)
    err, sig, half = np.abs(z) * math.sqrt(mmse[0]), math.sqrt(var_p[0]), 1 / 255
    mass = [
        0.5
        * (math.erfc((e - half) / sig / math.sqrt(2)) - math.erfc((e + half) / sig / math.sqrt(2)))
        for e in err
    ]
    decoder = -np.sum(w / w.sum() * np.log(mass))
    prior = 0.5 * (ab[-1] * s * s + (1 - ab[-1]) - 1 - np.log(1 - ab[-1]))
    return float((prior + decoder + kl.sum()) / math.log(2))


@pytest.mark.slow  # all T terms of the bound
def test_bits_per_dim_of_the_gaussian_target_matches_the_closed_form():
    """Data N(0, 0.3^2) per dimension with the exact optimal predictor: the Monte Carlo
    bound through the network path equals the closed form (8.06 bits/dim at T = 1000; the
    true NLL of such data at 8-bit resolution is 7.30, the rest is the gap of fixed
    reverse variances)."""
    s = 0.3
    schedule = get_schedule("linear", 1000)
    x0 = jax.random.normal(jax.random.PRNGKey(0), (2048, 16)) * s
    model_fn = gaussian_model_fn(schedule, jnp.zeros(16), s)
    bpd = bits_per_dim(model_fn, schedule, x0, jax.random.PRNGKey(1), clip_x0=False)
    expected = analytic_gaussian_bound(schedule, s)
    assert expected == pytest.approx(8.06, abs=0.01)
    assert float(np.mean(bpd)) == pytest.approx(expected, abs=0.04)
    entropy_bits = (0.5 * math.log(2 * math.pi * math.e * s * s) - math.log(2 / 255)) / math.log(2)
    assert entropy_bits < float(np.mean(bpd))  # a bound on the NLL
    # The quadrature over 100 of the 1000 terms estimates the same number.
    quad = bits_per_dim(model_fn, schedule, x0, jax.random.PRNGKey(1), clip_x0=False, num_terms=100)
    assert float(np.mean(quad)) == pytest.approx(expected, abs=0.15)
    # A wrong model (the Gaussian of std 0.6) costs bits.
    wrong = bits_per_dim(
        gaussian_model_fn(schedule, jnp.zeros(16), 0.6),
        schedule,
        x0,
        jax.random.PRNGKey(1),
        clip_x0=False,
    )
    assert float(np.mean(wrong)) > float(np.mean(bpd)) + 0.1
