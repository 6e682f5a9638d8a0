import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax_lab.diffusion import process, schedules


def test_q_sample_moments_monte_carlo():
    s = schedules.get_schedule("linear", 1000)
    x0 = jnp.array([1.5, -0.7, 0.2])
    n = 200_000
    for i in [0, 250, 999]:
        ab = s.alphas_cumprod[i]
        noise = jax.random.normal(jax.random.PRNGKey(i), (n, 3))
        xt = process.q_sample(jnp.broadcast_to(x0, (n, 3)), jnp.full((n,), ab), noise)
        np.testing.assert_allclose(np.mean(xt, 0), np.sqrt(ab) * x0, atol=5 / np.sqrt(n) * 1.0)
        np.testing.assert_allclose(np.var(xt, 0), np.full(3, 1 - ab), rtol=0.02, atol=1e-6)


def test_posterior_matches_bayes_rule():
    """q(x_{t-1} | x_t, x_0) from Gaussian conditioning, done independently in float64."""
    s = schedules.get_schedule("cosine", 100)
    ab = np.asarray(s.alphas_cumprod, np.float64)
    x0, xt = 0.8, -0.3
    for i in [1, 10, 50, 99]:
        ab_prev, alpha = ab[i - 1], ab[i] / ab[i - 1]
        # Prior from x0: x_{t-1} ~ N(sqrt(ab_prev) x0, 1 - ab_prev); likelihood
        # x_t | x_{t-1} ~ N(sqrt(alpha) x_{t-1}, 1 - alpha). Multiply the Gaussians.
        prec = 1 / (1 - ab_prev) + alpha / (1 - alpha)
        var = 1 / prec
        mean = var * (np.sqrt(ab_prev) * x0 / (1 - ab_prev) + np.sqrt(alpha) * xt / (1 - alpha))
        m, v = process.q_posterior_mean_variance(
            jnp.array([x0]), jnp.array([xt]), jnp.array([ab[i]]), jnp.array([ab_prev])
        )
        assert float(m[0]) == pytest.approx(mean, rel=1e-4, abs=1e-5)
        assert float(v[0]) == pytest.approx(var, rel=1e-3)
        # The schedule's precomputed arrays say the same.
        assert float(s.posterior_variance[i]) == pytest.approx(var, rel=1e-3)
        c1, c2 = float(s.posterior_mean_coef1[i]), float(s.posterior_mean_coef2[i])
        assert c1 * x0 + c2 * xt == pytest.approx(mean, rel=1e-3, abs=1e-5)


def test_prediction_conversions_round_trip():
    key = jax.random.PRNGKey(0)
    x0 = jax.random.normal(key, (8, 4, 4, 1))
    eps = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
    ab = jnp.linspace(0.05, 0.95, 8)
    xt = process.q_sample(x0, ab, eps)
    v = process.v_from_eps_x0(eps, x0, ab)
    for pred, out in [("eps", eps), ("x0", x0), ("v", v)]:
        x0_hat, eps_hat = process.to_x0_and_eps(pred, out, xt, ab)
        np.testing.assert_allclose(x0_hat, x0, atol=1e-4)
        np.testing.assert_allclose(eps_hat, eps, atol=1e-4)
        np.testing.assert_allclose(process.target_for(pred, x0, eps, ab), out, atol=1e-6)
    with pytest.raises(ValueError, match="diffusion.prediction"):
        process.to_x0_and_eps("score", eps, xt, ab)
