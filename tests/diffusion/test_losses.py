import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax_lab.diffusion import analytic, losses, process, schedules


def _as(prediction, eps_fn, schedule):
    """Wraps an eps predictor as a predictor of ``prediction`` (the same function)."""

    def model_fn(x_t, t):
        ab = schedule.alpha_bar_at(t)
        eps = eps_fn(x_t, t)
        x0 = process.predict_x0_from_eps(x_t, eps, ab)
        return process.target_for(prediction, x0, eps, ab)

    return model_fn


@pytest.mark.parametrize("weighting", ["min_snr", "elbo"])
def test_same_predictor_same_loss_in_every_parametrisation(weighting):
    s = schedules.get_schedule("cosine", 100)
    eps_fn = analytic.gaussian_model_fn(s, jnp.zeros(4), 0.5)
    x0 = 0.5 * jax.random.normal(jax.random.PRNGKey(0), (512, 4))
    noisy_eps = lambda x, t: eps_fn(x, t) + 0.1  # an imperfect model, so losses are non-zero
    values = {}
    for pred in process.PREDICTIONS:
        loss_fn = losses.get_loss_fn(s, pred, weighting)
        values[pred], _ = loss_fn(_as(pred, noisy_eps, s), x0, jax.random.PRNGKey(1))
    assert float(values["eps"]) > 0
    np.testing.assert_allclose(values["x0"], values["eps"], rtol=2e-3)
    np.testing.assert_allclose(values["v"], values["eps"], rtol=2e-3)


def test_uniform_is_plain_mse_with_diagnostics():
    s = schedules.get_schedule("linear", 1000)
    loss_fn = losses.get_loss_fn(s, "eps", "uniform")
    x0 = jnp.ones((64, 2))
    loss, aux = loss_fn(lambda x, t: jnp.zeros_like(x), x0, jax.random.PRNGKey(0))
    # Predicting 0 for eps ~ N(0, 1): the MSE is the sample variance of the noise, about 1.
    assert float(loss) == pytest.approx(1.0, abs=0.2)
    assert float(aux["mse"]) == pytest.approx(float(loss))
    assert set(aux) == {"mse", "mse_q0", "mse_q1", "mse_q2", "mse_q3"}


def test_elbo_weighting_matches_closed_form_for_gaussian_data():
    """E[loss] for the optimal predictor = sum_t w_t Var(x0 | x_t) / T (per dimension)."""
    T, s2 = 50, 0.25
    s = schedules.get_schedule("cosine", T)
    eps_fn = analytic.gaussian_model_fn(s, jnp.zeros(2), np.sqrt(s2))
    ab = np.asarray(s.alphas_cumprod, np.float64)
    post_var_x0 = s2 * (1 - ab) / (ab * s2 + 1 - ab)  # Var(x0 | x_t) for Gaussian data
    w = np.asarray(losses.x0_space_weights(s, "elbo"), np.float64)
    expected = np.mean(w * post_var_x0)
    loss_fn = jax.jit(lambda x0, k: losses.get_loss_fn(s, "eps", "elbo")(eps_fn, x0, k)[0])
    x0 = np.sqrt(s2) * jax.random.normal(jax.random.PRNGKey(0), (100_000, 2))
    got = np.mean([float(loss_fn(x0, jax.random.PRNGKey(i))) for i in range(5)])
    assert got == pytest.approx(expected, rel=0.05)


def test_min_snr_weight_caps_at_gamma():
    s = schedules.get_schedule("linear", 1000)
    w = losses.prediction_space_weights(s, "eps", "min_snr", 5.0)
    snr = np.asarray(s.snr)
    np.testing.assert_allclose(np.asarray(w), np.minimum(snr, 5.0) / snr, rtol=1e-5)
    assert float(w[-1]) == pytest.approx(1.0)  # low SNR: plain eps loss
    with pytest.raises(ValueError, match="diffusion.loss_weighting"):
        losses.get_loss_fn(s, "eps", "snr+1")
