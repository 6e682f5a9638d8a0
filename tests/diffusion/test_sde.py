"""The SDEs of sde.py against closed forms, ODE integration of their moments and simulation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import solve_ivp
from scipy.stats import norm

from diffax_lab.diffusion import analytic, process, schedules
from diffax_lab.diffusion import sde as sde_lib

SDES = {
    "vp": sde_lib.VPSDE(),
    "subvp": sde_lib.SubVPSDE(beta_min=0.2, beta_max=15.0),
    "ve": sde_lib.VESDE(sigma_min=0.01, sigma_max=20.0),
}


def _initial_variance(sde):
    """Var of x_0 around scale(0) x_0 as the SDE defines it: sigma_min^2 for VE (score_sde's
    convention), 0 for VP and sub-VP."""
    return float(sde.marginal_coeffs(jnp.zeros(1))[1][0]) ** 2


@pytest.mark.parametrize("name", sorted(SDES))
def test_marginal_solves_the_moment_odes(name):
    """d mean / dt = f mean and d var / dt = 2 f var + g^2, integrated by scipy, give the
    closed-form marginal (Saerkkae & Solin eqs. 5.50-5.51)."""
    sde = SDES[name]
    x0 = 0.7

    def rhs(t, y):
        tt = jnp.asarray([t], jnp.float32)
        f = float(sde.drift_coeff(tt)[0])
        g = float(sde.diffusion(tt)[0])
        return [f * y[0], 2 * f * y[1] + g * g]

    ts = np.array([0.05, 0.3, 0.7, 1.0])
    sol = solve_ivp(rhs, (0.0, 1.0), [x0, _initial_variance(sde)], t_eval=ts, rtol=1e-9, atol=1e-12)
    mean, std = sde.marginal(jnp.full((4, 1), x0), jnp.asarray(ts, jnp.float32))
    np.testing.assert_allclose(np.asarray(mean[:, 0]), sol.y[0], rtol=2e-4)
    np.testing.assert_allclose(np.asarray(std) ** 2, sol.y[1], rtol=2e-3)


@pytest.mark.parametrize("name", sorted(SDES))
def test_forward_simulation_matches_the_marginal(name):
    """Euler-Maruyama with 500 steps from x_0 = 1 (plus the t = 0 noise of VE)."""
    sde = SDES[name]
    n, steps = 10_000, 500
    dt = 1.0 / steps
    key = jax.random.PRNGKey(0)
    x = 1.0 + np.sqrt(_initial_variance(sde)) * jax.random.normal(key, (n, 1))

    def body(x, i):
        t = jnp.full((n,), i * dt)
        drift, g = sde.sde(x, t)
        z = jax.random.normal(jax.random.fold_in(key, i + 1), x.shape)
        return x + drift * dt + process.expand_to(g, x) * np.sqrt(dt) * z, x

    @jax.jit
    def simulate(x):
        x_end, xs = jax.lax.scan(body, x, jnp.arange(steps))
        return xs[steps // 4], x_end

    x_quarter, x_end = simulate(x)
    for t, xs in [(0.25, x_quarter), (1.0, x_end)]:
        mean, std = sde.marginal(jnp.ones((1, 1)), jnp.full((1,), t))
        s = float(std[0])
        xs = np.asarray(xs)
        assert xs.mean() == pytest.approx(float(mean[0, 0]), abs=4 * s / np.sqrt(n) + 1e-3)
        assert xs.std() == pytest.approx(s, rel=0.025)


def test_subvp_variance_is_below_vp():
    vp, sub = sde_lib.VPSDE(), sde_lib.SubVPSDE()
    t = jnp.linspace(0.01, 1.0, 50)
    assert np.all(np.asarray(sub.marginal_coeffs(t)[1]) < np.asarray(vp.marginal_coeffs(t)[1]))
    np.testing.assert_allclose(sub.marginal_coeffs(t)[0], vp.marginal_coeffs(t)[0])


@pytest.mark.parametrize("name", sorted(SDES))
def test_prior(name):
    sde = SDES[name]
    z = sde.prior_sample(jax.random.PRNGKey(0), (50_000, 3))
    assert float(jnp.std(z)) == pytest.approx(sde.prior_std, rel=0.01)
    expected = norm.logpdf(np.asarray(z[:5]), scale=sde.prior_std).sum(-1)
    np.testing.assert_allclose(np.asarray(sde.prior_logp(z[:5])), expected, rtol=1e-5)
    # The prior is the marginal at T for data near 0: VP to 4e-5 in variance, VE exactly up
    # to sigma_min.
    _, std_T = sde.marginal_coeffs(jnp.ones(1))
    assert float(std_T[0]) == pytest.approx(sde.prior_std, rel=1e-3)


@pytest.mark.parametrize("T", [100, 1000])
def test_discrete_linear_schedule_is_the_vp_sde_at_its_grid(T):
    s = schedules.get_schedule("linear", T)
    sde = sde_lib.VPSDE.from_schedule(s)
    assert sde.beta_min == pytest.approx(0.1) and sde.beta_max == pytest.approx(20.0)
    ab_cont = np.asarray(sde.alpha_bar(s.times), np.float64)
    ab = np.asarray(s.alphas_cumprod, np.float64)
    # prod_j (1 - beta_j) is a Riemann sum of exp(-int beta) with O(beta^2) terms: x_t's
    # scale sqrt(abar) and noise std sqrt(1 - abar) agree to O(1/T) at every grid point
    # (measured: 1.0e-3 at T = 1000, 1.0e-2 at T = 100).
    assert np.max(np.abs(np.sqrt(ab) - np.sqrt(ab_cont))) < 1.2 / T
    assert np.max(np.abs(np.sqrt(1 - ab) - np.sqrt(1 - ab_cont))) < 1.6 / T  # 1.3e-3, 1.4e-2
    np.testing.assert_allclose(
        ab_cont, schedules.continuous_alpha_bar("linear", T)(s.times), rtol=1e-5
    )
    with pytest.raises(ValueError, match="linear schedule"):
        sde_lib.VPSDE.from_schedule(schedules.get_schedule("cosine", T))


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_time_at_log_snr_inverts_the_schedule(name):
    s = schedules.get_schedule(name, 1000)
    np.testing.assert_allclose(s.time_at_log_snr(s.log_snr), s.times, atol=1e-6)
    t = jnp.asarray([0.0002, 0.0007, 0.3333, 0.7501])  # two below the first grid point
    np.testing.assert_allclose(s.time_at_log_snr(s.log_snr_at(t)), t, atol=2e-5)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_ddpm_network_as_a_score(prediction):
    """The exact eps-model of a mixture under the linear schedule, called through
    score_fn_from_model at the remapped time, is the mixture's exact score under the VP-SDE."""
    s = schedules.get_schedule("linear", 1000)
    sde = sde_lib.VPSDE.from_schedule(s)
    means, stds, weights = jnp.array([[-1.0, 0.5], [1.0, 0.0]]), jnp.array([0.3, 0.5]), [0.4, 0.6]
    eps_fn = analytic.gaussian_mixture_model_fn(s, means, stds, weights)

    def model_fn(x_t, t):  # the same network, in the requested parametrisation
        ab = s.alpha_bar_at(t)
        eps = eps_fn(x_t, t)
        return process.target_for(prediction, process.predict_x0_from_eps(x_t, eps, ab), eps, ab)

    score_fn = jax.jit(sde_lib.score_fn_from_model(model_fn, sde, prediction, schedule=s))
    exact = jax.jit(analytic.mixture_score_fn(sde, means, stds, weights))
    x = 1.5 * jax.random.normal(jax.random.PRNGKey(0), (64, 2))
    for t in (0.05, 0.4, 0.9):
        tb = jnp.full((64,), t)
        np.testing.assert_allclose(score_fn(x, tb), exact(x, tb), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("name", sorted(SDES))
def test_reverse_and_probability_flow_drifts(name):
    """For Gaussian data the probability-flow ODE moves x_t = scale mu + sd_t z with z fixed:
    its drift equals d/dt of that path (finite differences)."""
    sde = SDES[name]
    mean, var = 0.4, 0.09
    score_fn = analytic.gaussian_score_fn(sde, [mean], [[var]])
    t, h = 0.37, 1e-3
    z = jnp.linspace(-2, 2, 9)[:, None]

    def path(t):
        scale, std = sde.marginal_coeffs(jnp.full((9,), t, jnp.float32))
        return scale[:, None] * mean + jnp.sqrt(scale**2 * var + std**2)[:, None] * z

    @jax.jit
    def drifts(x, tb):
        rev = sde.reverse(score_fn)
        f, g = sde.sde(x, tb)
        expected = f - (g**2)[:, None] * score_fn(x, tb)
        flow = sde.probability_flow(score_fn)(x, tb)
        return flow, rev.drift(x, tb), expected, rev.diffusion(tb), g

    dpath = (path(t + h) - path(t - h)) / (2 * h)
    flow, rev_drift, expected, rev_g, g = drifts(path(t), jnp.full((9,), t))
    np.testing.assert_allclose(flow, dpath, rtol=1e-2, atol=1e-3)
    np.testing.assert_allclose(rev_drift, expected, rtol=1e-6)
    np.testing.assert_allclose(rev_g, g)


def test_bad_parameters_are_named():
    with pytest.raises(ValueError, match="diffusion.sigma_max"):
        sde_lib.VESDE(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="diffusion.sde"):
        sde_lib.get_sde("vpp")
    with pytest.raises(ValueError, match="v prediction"):
        sde_lib.score_fn_from_model(lambda x, t: x, sde_lib.VESDE(), "v")
