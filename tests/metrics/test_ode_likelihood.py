"""Probability-flow ODE likelihoods against closed-form densities (exact scores)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax_lab.diffusion import analytic
from diffax_lab.diffusion import sde as sde_lib
from diffax_lab.metrics import ode_likelihood

EPS = 1e-5
SDE = sde_lib.VPSDE()


@pytest.fixture(scope="module")
def correlated_gaussian():
    """Data N(mean, cov) in D = 4 with a full covariance (so Hutchinson's estimate of the
    divergence is noisy for Rademacher probes too), 256 points, and log p_eps exactly."""
    rng = np.random.default_rng(0)
    a = 0.5 * rng.normal(size=(4, 4))
    cov = a @ a.T + 0.05 * np.eye(4)
    mean = 0.5 * rng.normal(size=4)
    x = rng.multivariate_normal(mean, cov, size=256).astype(np.float32)
    scale, std = SDE.marginal_coeffs(jnp.full((256,), EPS))
    exact = analytic.gaussian_log_prob(x, scale, std, mean, cov)
    return analytic.gaussian_score_fn(SDE, mean, cov), jnp.asarray(x), exact


def test_log_likelihood_of_a_gaussian_is_exact_within_one_percent(correlated_gaussian):
    score_fn, x, exact = correlated_gaussian
    out = ode_likelihood.ode_log_likelihood(
        score_fn, SDE, x, jax.random.PRNGKey(0), num_probes=16, probe="rademacher", eps=EPS
    )
    ll, stderr = np.asarray(out.log_likelihood), np.asarray(out.stderr)
    assert ll.mean() == pytest.approx(exact.mean(), rel=0.01)
    # The per-image Hutchinson standard error is honest: errors are that size, not larger.
    z = (ll - exact) / stderr
    assert 0.5 < np.sqrt(np.mean(z**2)) < 1.5
    batch_stderr = np.std(ll - exact, ddof=1) / np.sqrt(ll.size)
    assert abs(ll.mean() - exact.mean()) < 4 * batch_stderr + 0.01
    assert 20 < int(out.nfe) < 300


def test_gaussian_probes_are_unbiased_and_noisier(correlated_gaussian):
    score_fn, x, exact = correlated_gaussian
    rad = ode_likelihood.ode_log_likelihood(
        score_fn, SDE, x, jax.random.PRNGKey(1), num_probes=4, eps=EPS
    )
    gau = ode_likelihood.ode_log_likelihood(
        score_fn, SDE, x, jax.random.PRNGKey(1), num_probes=4, probe="gaussian", eps=EPS
    )
    for out in (rad, gau):
        err = np.asarray(out.log_likelihood) - exact
        assert abs(err.mean()) < 4 * err.std(ddof=1) / np.sqrt(err.size)
    assert np.mean(np.asarray(gau.stderr)) > np.mean(np.asarray(rad.stderr))


def test_isotropic_gaussian_with_rademacher_probes_is_exact():
    """The flow's Jacobian is a multiple of I, so v^T J v = tr J for every +-1 probe: the only
    errors left are the solver's and p_T's distance from N(0, I)."""
    mean, cov = np.array([0.3, -0.2, 0.1]), 0.2 * np.eye(3)
    x = jnp.asarray(
        mean + np.sqrt(0.2) * np.random.default_rng(1).normal(size=(64, 3)), jnp.float32
    )
    out = ode_likelihood.ode_log_likelihood(
        analytic.gaussian_score_fn(SDE, mean, cov),
        SDE,
        x,
        jax.random.PRNGKey(0),
        num_probes=2,
        eps=EPS,
    )
    scale, std = SDE.marginal_coeffs(jnp.full((64,), EPS))
    exact = analytic.gaussian_log_prob(x, scale, std, mean, cov)
    # p_T differs from N(0, I) by a mean of sqrt(abar_T) mean ~ 2e-3: up to ~5e-3 nats.
    np.testing.assert_allclose(np.asarray(out.log_likelihood), exact, atol=1e-2)
    np.testing.assert_allclose(np.asarray(out.stderr), 0.0, atol=1e-4)


def test_mixture_log_likelihood_through_a_curved_flow():
    sde = sde_lib.SubVPSDE()
    means, stds, weights = (
        jnp.array([[-1.0, 0.0], [1.0, 0.5]]),
        jnp.array([0.3, 0.4]),
        jnp.array([0.5, 0.5]),
    )
    key_c, key_x = jax.random.split(jax.random.PRNGKey(0))
    comp = jax.random.bernoulli(key_c, 0.5, (128,)).astype(jnp.int32)
    x = means[comp] + stds[comp][:, None] * jax.random.normal(key_x, (128, 2))
    out = ode_likelihood.ode_log_likelihood(
        analytic.mixture_score_fn(sde, means, stds, weights),
        sde,
        x,
        jax.random.PRNGKey(1),
        num_probes=8,
        eps=1e-3,
    )
    scale, std = sde.marginal_coeffs(jnp.full((128,), 1e-3))
    exact = np.asarray(analytic.mixture_log_prob(x, scale, std, means, stds, weights))
    err = np.asarray(out.log_likelihood) - exact
    # In 2-D a few +-1 probes often agree exactly, so per-image standard errors are not
    # tested here (the correlated Gaussian above tests them); the batch mean is unbiased.
    assert abs(err.mean()) < 4 * err.std(ddof=1) / np.sqrt(err.size) + 0.01
    assert abs(err.mean()) < 0.01 * abs(exact.mean())


def test_bits_per_dim_with_dequantization(correlated_gaussian):
    """bpd = -log p(y) / (D ln 2) + log2(127.5) at the dequantized y, with the batch's
    standard error; checked against the exact density at the same y."""
    score_fn, _, _ = correlated_gaussian
    rng = np.random.default_rng(2)
    x = np.clip(0.3 * rng.normal(size=(128, 4)), -1, 1)
    x = (np.round((x + 1) * 127.5) / 127.5 - 1).astype(np.float32)  # 8-bit values in [-1, 1]
    key = jax.random.PRNGKey(3)
    res = ode_likelihood.ode_bits_per_dim(score_fn, SDE, jnp.asarray(x), key, num_probes=8, eps=EPS)
    y = ode_likelihood.dequantize(jnp.asarray(x), jax.random.split(key)[0])
    assert np.all(np.abs(np.asarray(y) - x) <= 1 / 255 + 1e-6) and np.any(np.asarray(y) != x)
    # The density the score belongs to (the fixture's Gaussian), at y.
    rng0 = np.random.default_rng(0)
    a = 0.5 * rng0.normal(size=(4, 4))
    cov, mean = a @ a.T + 0.05 * np.eye(4), 0.5 * rng0.normal(size=4)
    scale, std = SDE.marginal_coeffs(jnp.full((128,), EPS))
    exact = -analytic.gaussian_log_prob(y, scale, std, mean, cov) / (4 * math.log(2)) + math.log2(
        127.5
    )
    assert res.mean == pytest.approx(exact.mean(), rel=0.01)
    assert res.stderr == pytest.approx(np.std(res.bpd, ddof=1) / np.sqrt(128), rel=1e-6)
    assert res.bpd.shape == (128,) and res.hutchinson_stderr.shape == (128,) and res.nfe > 0


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="eval.probe"):
        ode_likelihood.ode_log_likelihood(
            lambda x, t: -x, SDE, jnp.zeros((2, 2)), jax.random.PRNGKey(0), probe="sobol"
        )
    with pytest.raises(ValueError, match="eval.num_probes"):
        ode_likelihood.ode_log_likelihood(
            lambda x, t: -x, SDE, jnp.zeros((2, 2)), jax.random.PRNGKey(0), num_probes=0
        )
