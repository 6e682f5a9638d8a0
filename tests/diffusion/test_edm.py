"""EDM (Karras et al. 2022): preconditioning, loss and samplers against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax_lab.diffusion import analytic, edm, samplers, schedules
from diffax_lab.diffusion import sde as sde_lib

SIGMAS = jnp.asarray([0.002, 0.05, 0.5, 2.0, 80.0])
MEANS = jnp.array([[-2.0, 0.0], [2.0, 1.0]])
STDS, WEIGHTS = jnp.array([0.3, 0.5]), jnp.array([0.3, 0.7])
ONES = jnp.ones_like(SIGMAS)
ZEROS = jnp.zeros_like(SIGMAS)


@pytest.mark.parametrize("sigma_data", [0.5, 1.3])
def test_unit_variance_conditions(sigma_data):
    """App. B.6: Var[c_in (y + n)] = 1 (eq. 114); the effective target (y - c_skip (y + n)) /
    c_out has unit variance (eq. 117), and c_skip is the value that minimises c_out (eq. 131)."""
    c_skip, c_out, c_in, c_noise = edm.preconditioning(SIGMAS, sigma_data)
    s2, d2 = np.asarray(SIGMAS, np.float64) ** 2, sigma_data**2
    np.testing.assert_allclose(np.asarray(c_in) ** 2 * (d2 + s2), 1.0, rtol=1e-5)
    target_var = ((1 - c_skip) ** 2 * d2 + c_skip**2 * s2) / c_out**2
    np.testing.assert_allclose(target_var, 1.0, rtol=1e-5)
    # d/dc [(1 - c)^2 d2 + c^2 s2] = 0 at c_skip.
    np.testing.assert_allclose(-2 * (1 - c_skip) * d2 + 2 * c_skip * s2, 0.0, atol=1e-5)
    np.testing.assert_allclose(edm.loss_weight(SIGMAS, sigma_data) * c_out**2, 1.0, rtol=1e-5)
    np.testing.assert_allclose(c_noise, np.log(np.asarray(SIGMAS)) / 4, rtol=1e-6)
    # The same by simulation, at sigma = 2 with y ~ N(0, sigma_data^2).
    key_y, key_n = jax.random.split(jax.random.PRNGKey(0))
    y = sigma_data * jax.random.normal(key_y, (200_000,))
    x = y + 2.0 * jax.random.normal(key_n, y.shape)
    c_skip, c_out, c_in, _ = edm.preconditioning(2.0, sigma_data)
    assert float(jnp.var(c_in * x)) == pytest.approx(1.0, rel=0.01)
    assert float(jnp.var((y - c_skip * x) / c_out)) == pytest.approx(1.0, rel=0.01)


def _ve_mixture_score(sde):
    score = analytic.mixture_score_fn(sde, MEANS, STDS, WEIGHTS)
    return lambda x, sigma: score(x, sde.time_at_sigma(sigma))


def test_denoiser_from_the_exact_score_is_the_posterior_mean():
    sde = sde_lib.VESDE(sigma_min=0.002, sigma_max=80.0)
    denoiser = jax.jit(edm.denoiser_from_score(_ve_mixture_score(sde)))
    x = (
        jax.random.normal(jax.random.PRNGKey(0), (5, 64, 2))
        * jnp.sqrt(4.0 + SIGMAS**2)[:, None, None]
    )
    for i, sigma in enumerate(np.asarray(SIGMAS)):
        sig = jnp.full((64,), sigma)
        posterior_mean = analytic.mixture_posterior_mean(
            x[i], sig * 0 + 1, sig, MEANS, STDS, WEIGHTS
        )
        np.testing.assert_allclose(
            denoiser(x[i], sig), posterior_mean, rtol=1e-3, atol=1e-3 * (1 + sigma)
        )


def ideal_net(sigma_data, mean, std):
    """F*(x_in, c_noise) whose preconditioned denoiser is E[y | x] for data N(mean, std^2)."""

    def net_fn(x_in, c_noise):
        sigma = jnp.exp(4.0 * c_noise)
        c_skip, c_out, c_in, _ = edm.preconditioning(sigma, sigma_data)
        x = x_in / c_in[:, None]
        posterior_mean = mean + (std**2 / (std**2 + sigma**2))[:, None] * (x - mean)
        return (posterior_mean - c_skip[:, None] * x) / c_out[:, None]

    return net_fn


def test_preconditioned_ideal_network_is_the_posterior_mean_and_its_loss_is_one():
    """For data N(0, sigma_data^2) the optimal loss lambda(sigma) Var[y | x] is exactly 1 per
    dimension at every sigma, so get_loss_fn's value at the ideal network is 1; any other
    network scores higher."""
    sigma_data = 0.5
    net = ideal_net(sigma_data, 0.0, sigma_data)
    denoiser = edm.make_denoiser(net, sigma_data)
    x = jax.random.normal(jax.random.PRNGKey(0), (64, 3))
    sig = jnp.full((64,), 1.7)
    np.testing.assert_allclose(
        denoiser(x, sig), sigma_data**2 / (sigma_data**2 + 1.7**2) * x, rtol=1e-5, atol=1e-6
    )
    loss_fn = jax.jit(
        lambda net_fn, x0, k: edm.get_loss_fn(sigma_data)(net_fn, x0, k), static_argnums=0
    )
    x0 = sigma_data * jax.random.normal(jax.random.PRNGKey(1), (20_000, 4))
    loss, aux = loss_fn(net, x0, jax.random.PRNGKey(2))
    assert float(loss) == pytest.approx(1.0, rel=0.02)
    for q in range(4):  # the same in every quarter of the sigma distribution
        assert float(aux[f"loss_q{q}"]) == pytest.approx(1.0, rel=0.04)
    worse = ideal_net(sigma_data, 0.5, sigma_data)  # the posterior mean of a shifted prior
    assert float(loss_fn(worse, x0, jax.random.PRNGKey(2))[0]) > float(loss) + 0.1


def test_deterministic_edm_sampler_is_the_registered_heun():
    """edm.sample with S_churn = 0 on the schedule's sigma range is samplers.sample('heun')."""
    s = schedules.get_schedule("linear", 1000)
    model_fn = analytic.gaussian_mixture_model_fn(s, MEANS, STDS, WEIGHTS)
    x_T = jax.random.normal(jax.random.PRNGKey(1), (500, 2))
    heun = jax.jit(
        lambda k: samplers.sample(
            model_fn, s, x_T.shape, k, sampler="heun", num_steps=30, x_T=x_T, clip_x0=None
        )
    )
    ab = np.asarray(s.alphas_cumprod, np.float64)
    s_max, s_min = np.sqrt((1 - ab[-1]) / ab[-1]), np.sqrt((1 - ab[0]) / ab[0])
    denoiser = edm.denoiser_from_model(model_fn, s)
    out = jax.jit(
        lambda k: edm.sample(
            denoiser,
            x_T.shape,
            k,
            num_steps=30,
            sigma_min=s_min,
            sigma_max=s_max,
            x_T=x_T / np.sqrt(ab[-1]),
        )
    )(jax.random.PRNGKey(0))
    assert out.nfe == 59
    np.testing.assert_allclose(out.samples, heun(jax.random.PRNGKey(0)).samples, atol=1e-3)


@pytest.mark.parametrize(
    "kw",
    [{}, {"S_churn": 40.0, "S_tmin": 0.05, "S_tmax": 50.0, "S_noise": 1.003}],
)
def test_edm_sampler_recovers_the_mixture(kw):
    sde = sde_lib.VESDE(sigma_min=0.002, sigma_max=80.0)
    denoiser = edm.denoiser_from_score(_ve_mixture_score(sde))
    out = jax.jit(lambda k: edm.sample(denoiser, (4000, 2), k, num_steps=64, **kw))(
        jax.random.PRNGKey(0)
    )
    x = np.asarray(out.samples)
    comp = np.argmin(((x[:, None] - np.asarray(MEANS)[None]) ** 2).sum(-1), axis=1)
    assert np.mean(comp == 1) == pytest.approx(0.7, abs=0.03)
    for k in range(2):
        np.testing.assert_allclose(x[comp == k].mean(0), np.asarray(MEANS[k]), atol=0.05)
        np.testing.assert_allclose(x[comp == k].std(0), float(STDS[k]), rtol=0.06)


def test_churn_only_inside_its_sigma_window():
    """With S_tmax below every grid sigma, churn changes nothing; inside the window it does."""
    sde = sde_lib.VESDE(sigma_min=0.002, sigma_max=80.0)
    denoiser = edm.denoiser_from_score(_ve_mixture_score(sde))
    x_T = 80.0 * jax.random.normal(jax.random.PRNGKey(3), (200, 2))

    def run(**kw):
        return np.asarray(
            edm.sample(
                denoiser, x_T.shape, jax.random.PRNGKey(0), num_steps=8, x_T=x_T, **kw
            ).samples
        )

    plain = run()
    np.testing.assert_allclose(run(S_churn=40.0, S_tmax=1e-4), plain, rtol=1e-6)
    assert np.max(np.abs(run(S_churn=40.0) - plain)) > 0.1
