"""Samplers driven by exact optimal predictors: no training, known answers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax_lab.diffusion import analytic, samplers, schedules

N = 4000


def _run(model_fn, s, shape, seed=0, **kw):
    kw.setdefault("clip_x0", None)  # the analytic targets reach outside [-1, 1]
    if kw.get("sampler", "ddpm") == "ddpm":
        kw.setdefault("variance", "beta_tilde")
    fn = jax.jit(lambda k: samplers.sample(model_fn, s, shape, k, **kw))
    return fn(jax.random.PRNGKey(seed))


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_ddpm_recovers_gaussian(name, variance):
    s = schedules.get_schedule(name, 1000)
    mean, std = jnp.array([1.0, -2.0]), 0.5
    out = _run(analytic.gaussian_model_fn(s, mean, std), s, (N, 2), variance=variance)
    x = np.asarray(out.samples)
    np.testing.assert_allclose(x.mean(0), np.asarray(mean), atol=0.05 * 2.0)
    np.testing.assert_allclose(x.var(0), std**2, rtol=0.05 * 2)  # 5% on std <=> ~10% on var
    np.testing.assert_allclose(np.sqrt(x.var(0)), std, rtol=0.05)


def test_ddpm_recovers_mixture_weights():
    s = schedules.get_schedule("linear", 1000)
    means = jnp.array([[-2.0, 0.0], [2.0, 1.0]])
    stds, weights = jnp.array([0.3, 0.5]), jnp.array([0.3, 0.7])
    out = _run(analytic.gaussian_mixture_model_fn(s, means, stds, weights), s, (N, 2))
    x = np.asarray(out.samples)
    comp = np.argmin(((x[:, None] - np.asarray(means)[None]) ** 2).sum(-1), axis=1)
    assert np.mean(comp == 1) == pytest.approx(0.7, abs=0.03)
    for k in range(2):
        xs = x[comp == k]
        np.testing.assert_allclose(xs.mean(0), np.asarray(means[k]), atol=0.05)
        np.testing.assert_allclose(xs.std(0), float(stds[k]), rtol=0.05)


def test_trajectory_and_clipping():
    s = schedules.get_schedule("linear", 100)
    model_fn = analytic.gaussian_model_fn(s, jnp.zeros(3), 2.0)
    out = _run(model_fn, s, (16, 3), num_trajectory=5, clip_x0=1.0, variance="beta")
    assert out.trajectory.shape == (5, 16, 3)
    assert out.trajectory_times[0] == pytest.approx(1.0) and np.all(
        np.diff(out.trajectory_times) < 0
    )
    # The first frame is x_T ~ N(0, 1); with x0 clipped to [-1, 1] the last update is the
    # clipped x0 itself (no noise at t = 1).
    assert np.all(np.abs(np.asarray(out.samples)) <= 1.0 + 1e-5)
    assert np.std(np.asarray(out.trajectory[0])) == pytest.approx(1.0, abs=0.35)


def test_ddim_eta0_deterministic_and_respaced():
    s = schedules.get_schedule("cosine", 1000)
    model_fn = analytic.gaussian_model_fn(s, jnp.array([0.5]), 0.3)
    x_T = jax.random.normal(jax.random.PRNGKey(3), (N, 1))
    a = _run(model_fn, s, (N, 1), seed=1, sampler="ddim", num_steps=50, eta=0.0, x_T=x_T).samples
    b = _run(model_fn, s, (N, 1), seed=2, sampler="ddim", num_steps=50, eta=0.0, x_T=x_T).samples
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(jnp.mean(a)) == pytest.approx(0.5, abs=0.02)
    assert float(jnp.std(a)) == pytest.approx(0.3, rel=0.05)


def test_ddim_eta1_has_ddpm_posterior_variance():
    """With eta = 1 over all T steps, DDIM's per-step noise variance is beta_tilde_t."""
    s = schedules.get_schedule("linear", 1000)
    ab, ab_prev = s.alphas_cumprod, s.alphas_cumprod_prev
    zeros = jnp.zeros((20_000, 1))
    for i in [1, 500, 999]:
        key = jax.random.PRNGKey(i)
        abt, abp = jnp.full((20_000,), ab[i]), jnp.full((20_000,), ab_prev[i])
        out = samplers.ddim_update(zeros, zeros, abt, abp, key, eta=1.0)
        assert float(jnp.var(out)) == pytest.approx(float(s.posterior_variance[i]), rel=0.03)


def exact_ode_solution(x_T, schedule, mean, std):
    """The probability-flow ODE for Gaussian data keeps z = (x_t - sqrt(ab) mu) / sd_t fixed."""
    ab_T = float(schedule.alphas_cumprod[-1])
    z = (x_T - np.sqrt(ab_T) * mean) / np.sqrt(ab_T * std**2 + 1 - ab_T)
    return mean + std * z


DETERMINISTIC = [("ddim", {"eta": 0.0}), ("dpm_solver++", {}), ("euler", {}), ("heun", {})]
ORDER = {"ddim": 1, "euler": 1, "dpm_solver++": 2, "heun": 2}


@pytest.mark.parametrize("name,kw", DETERMINISTIC)
def test_ode_samplers_converge_at_their_order(name, kw):
    """Error against the exact flow falls ~4x (first order) or ~16x (second) per 4x steps."""
    s = schedules.get_schedule("linear", 1000)
    mean, std = 0.5, 0.3
    model_fn = analytic.gaussian_model_fn(s, jnp.array([mean]), std)
    x_T = jax.random.normal(jax.random.PRNGKey(3), (1000, 1))
    exact = exact_ode_solution(np.asarray(x_T), s, mean, std)
    errors = []
    for steps in (50, 200):
        out = _run(model_fn, s, (1000, 1), sampler=name, num_steps=steps, x_T=x_T, **kw)
        errors.append(float(np.mean(np.abs(np.asarray(out.samples) - exact))))
    ratio = errors[0] / errors[1]
    assert (3.0 < ratio < 6.0) if ORDER[name] == 1 else (ratio > 10.0), errors
    assert errors[1] < 0.02 * std, errors


@pytest.mark.parametrize("name,kw", [("ddpm", {}), *DETERMINISTIC])
def test_every_sampler_recovers_the_mixture(name, kw):
    s = schedules.get_schedule("linear", 1000)
    means = jnp.array([[-2.0, 0.0], [2.0, 1.0]])
    stds, weights = jnp.array([0.3, 0.5]), jnp.array([0.3, 0.7])
    model_fn = analytic.gaussian_mixture_model_fn(s, means, stds, weights)
    steps = 1000 if name == "ddpm" else 250
    x = np.asarray(_run(model_fn, s, (N, 2), sampler=name, num_steps=steps, **kw).samples)
    comp = np.argmin(((x[:, None] - np.asarray(means)[None]) ** 2).sum(-1), axis=1)
    assert np.mean(comp == 1) == pytest.approx(0.7, abs=0.03)
    for k in range(2):
        np.testing.assert_allclose(x[comp == k].mean(0), np.asarray(means[k]), atol=0.05)
        np.testing.assert_allclose(x[comp == k].std(0), float(stds[k]), rtol=0.06)


def test_ddpm_error_shrinks_with_steps():
    s = schedules.get_schedule("cosine", 1000)
    model_fn = analytic.gaussian_model_fn(s, jnp.array([0.5]), 0.3)
    err = []
    for steps in (5, 1000):
        x = np.asarray(_run(model_fn, s, (20_000, 1), num_steps=steps, variance="beta").samples)
        err.append(abs(x.std() - 0.3) + abs(x.mean() - 0.5))
    assert err[1] < err[0], err


def test_unknown_sampler_named():
    s = schedules.get_schedule("linear", 100)
    with pytest.raises(ValueError, match="sample.sampler"):
        samplers.sample(lambda x, t: x, s, (1, 1), jax.random.PRNGKey(0), sampler="magic")


def test_skip_step0_grid_spends_every_step_above_step0():
    """DPM-Solver++'s grid: the n noisiest of n + 1 spaced steps, then t = 0 (diffusers'
    'linspace' spacing with a zero final sigma); with n = T, all T steps."""
    s = schedules.get_schedule("linear", 1000)
    times, abar = samplers.discrete_grid(s, 20, "uniform", skip_step0=True)
    expected = np.round(np.linspace(0, 999, 21))[::-1][:-1].astype(int)  # diffusers' timesteps
    np.testing.assert_allclose(times[:-1], np.asarray(s.times)[expected])
    assert times[-1] == 0.0 and abar[-1] == 1.0 and len(times) == 21
    full, _ = samplers.discrete_grid(s, 1000, "uniform", skip_step0=True)
    np.testing.assert_allclose(full[:-1], np.asarray(s.times)[::-1])
    kept, _ = samplers.discrete_grid(s, 20, "uniform")
    assert kept[-2] == pytest.approx(float(s.times[0]))  # the plain grid keeps step 0
    assert samplers.SAMPLER_GRIDS["dpm_solver++"] == "discrete_skip_step0"
