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


def _ve_exact_score_model(s2, scale_by_sigma=True):
    """model_fn(x, sigma) of the exact score of N(0, s2 I) blurred by sigma: -x / (s2 + sigma^2)."""

    def model_fn(x, sigma):
        score = -x / (s2 + sigma[:, None] ** 2)
        return sigma[:, None] * score if scale_by_sigma else score

    return model_fn


@pytest.mark.parametrize("num_scales", [None, 10])
def test_ve_loss_of_the_exact_score_matches_closed_form(num_scales):
    """E||sigma s(y + sigma z) + z||^2 / D = s2 / (s2 + sigma^2) for data N(0, s2 I), averaged
    over sigma(t), t ~ U(eps, 1) (quadrature), or over NCSN's geometric levels."""
    from diffax_lab.diffusion.sde import VESDE

    sde, s2 = VESDE(sigma_min=0.01, sigma_max=10.0), 0.25
    if num_scales is None:
        t = np.linspace(1e-5, 1.0, 20_001)
        expected = np.trapezoid(s2 / (s2 + np.asarray(sde.sigma(t), np.float64) ** 2), t)
        expected /= 1.0 - 1e-5
    else:
        expected = np.mean(s2 / (s2 + sde.discrete_sigmas(num_scales) ** 2))
    loss_fn = jax.jit(
        lambda x0, k: losses.get_ve_loss_fn(sde, num_scales)(_ve_exact_score_model(s2), x0, k)
    )
    x0 = np.sqrt(s2) * jax.random.normal(jax.random.PRNGKey(0), (100_000, 2))
    loss, aux = loss_fn(x0, jax.random.PRNGKey(1))
    assert float(loss) == pytest.approx(expected, rel=0.03)
    assert float(aux["dsm"]) == pytest.approx(float(loss))


def test_ve_loss_weighting_and_output_scaling():
    from diffax_lab.diffusion.sde import VESDE, VPSDE

    sde = VESDE(sigma_min=0.01, sigma_max=10.0)
    x0 = 0.5 * jax.random.normal(jax.random.PRNGKey(0), (256, 3))
    key = jax.random.PRNGKey(1)
    imperfect = _ve_exact_score_model(0.3)  # the score of the wrong variance: loss > optimum
    plain, _ = losses.get_ve_loss_fn(sde)(imperfect, x0, key)
    weighted, aux = losses.get_ve_loss_fn(sde, likelihood_weighting=True)(imperfect, x0, key)
    np.testing.assert_allclose(weighted, 2 * np.log(1000.0) * plain, rtol=1e-5)
    np.testing.assert_allclose(aux["dsm"], plain, rtol=1e-6)
    unscaled, _ = losses.get_ve_loss_fn(sde, scale_by_sigma=False)(
        _ve_exact_score_model(0.3, scale_by_sigma=False), x0, key
    )
    np.testing.assert_allclose(unscaled, plain, rtol=1e-5)
    with pytest.raises(ValueError, match="likelihood_weighting"):
        losses.get_ve_loss_fn(sde, num_scales=10, likelihood_weighting=True)
    with pytest.raises(ValueError, match="VESDE"):
        losses.get_ve_loss_fn(VPSDE())
