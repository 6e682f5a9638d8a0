"""SDE samplers driven by exact scores: no training, known answers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax_lab.diffusion import analytic, process, samplers, schedules, sde_samplers
from diffax_lab.diffusion import sde as sde_lib

N = 4000
KEY = jax.random.PRNGKey(0)
MEANS = jnp.array([[-2.0, 0.0], [2.0, 1.0]])
STDS, WEIGHTS = jnp.array([0.3, 0.5]), jnp.array([0.3, 0.7])


def assert_recovers_mixture(x, weight_tol=0.03, mean_tol=0.05, std_rtol=0.06):
    x = np.asarray(x)
    comp = np.argmin(((x[:, None] - np.asarray(MEANS)[None]) ** 2).sum(-1), axis=1)
    assert np.mean(comp == 1) == pytest.approx(0.7, abs=weight_tol)
    for k in range(2):
        np.testing.assert_allclose(x[comp == k].mean(0), np.asarray(MEANS[k]), atol=mean_tol)
        np.testing.assert_allclose(x[comp == k].std(0), float(STDS[k]), rtol=std_rtol)


@pytest.mark.parametrize(
    "name,predictor,corrector",
    [
        ("vp", "reverse_diffusion", "langevin"),
        ("ve", "reverse_diffusion", "langevin"),
        ("subvp", "ancestral", "langevin"),
        ("vp", "euler_maruyama", "none"),
    ],
)
def test_pc_sampler_recovers_the_mixture(name, predictor, corrector):
    sde = sde_lib.get_sde(name)
    score_fn = analytic.mixture_score_fn(sde, MEANS, STDS, WEIGHTS)
    run = jax.jit(
        lambda k: sde_samplers.sde_sample(
            score_fn, sde, (N, 2), k, predictor=predictor, corrector=corrector, num_steps=300
        )
    )
    out = run(jax.random.PRNGKey(0))
    assert out.nfe == 300 * (1 + (corrector != "none")) + 1
    assert_recovers_mixture(out.samples)


def test_ode_sampler_recovers_the_mixture_with_both_solvers():
    sde = sde_lib.VPSDE()
    score_fn = analytic.mixture_score_fn(sde, MEANS, STDS, WEIGHTS)
    for solver in ("tsit5", "dopri5"):
        run = jax.jit(
            lambda k, solver=solver: sde_samplers.ode_sample(
                score_fn, sde, (N, 2), k, solver=solver
            )
        )
        out = run(jax.random.PRNGKey(0))
        assert 20 < int(out.nfe) < 400
        assert_recovers_mixture(out.samples)


def test_ode_error_falls_as_the_tolerance_tightens():
    """Gaussian data: the exact flow keeps z = (x_t - scale mu) / sd_t fixed, so the exact
    x(eps) is known; the error and the NFE move with the tolerance."""
    sde = sde_lib.VESDE(sigma_max=20.0)
    mean, var, eps = 0.5, 0.09, 1e-3
    score_fn = analytic.gaussian_score_fn(sde, [mean], [[var]])
    x_T = sde.prior_sample(jax.random.PRNGKey(1), (2000, 1))

    def run(x_T, tol):
        return sde_samplers.ode_sample(
            score_fn, sde, x_T.shape, None, rtol=tol, atol=tol, eps=eps, denoise=False, x_T=x_T
        )

    def exact_at(t, x):
        scale, std = (np.asarray(a, np.float64) for a in sde.marginal_coeffs(jnp.full((1,), t)))
        return scale * mean, np.sqrt(scale**2 * var + std**2)

    m_T, s_T = exact_at(1.0, x_T)
    m_e, s_e = exact_at(eps, x_T)
    exact = m_e + s_e * (np.asarray(x_T, np.float64) - m_T) / s_T
    errors, nfes = [], []
    for tol in (1e-2, 1e-4, 1e-6):
        out = jax.jit(lambda x, tol=tol: run(x, tol))(x_T)
        errors.append(float(np.max(np.abs(np.asarray(out.samples) - exact))))
        nfes.append(int(out.nfe))
    assert errors[0] > 5 * errors[1] > 5 * errors[2], errors
    assert errors[2] < 1e-4, errors
    assert nfes[0] < nfes[1] < nfes[2], nfes


def test_nfe_counts_every_evaluation():
    """solve_ode's count (6 per attempted step + 1) against a host-side counter."""
    calls = []

    def vector_field(y, t):
        jax.debug.callback(lambda: calls.append(1))
        return -y * (1.0 + jnp.sin(10.0 * t))

    for solver in ("tsit5", "dopri5"):
        calls.clear()
        y, nfe = jax.jit(
            lambda y0, solver=solver: sde_samplers.solve_ode(
                vector_field, y0, 1.0, 0.0, solver=solver, rtol=1e-6
            )
        )(jnp.ones(3))
        jax.block_until_ready(y)
        assert int(nfe) == len(calls) > 20


def test_updates_match_score_sde_and_ddpm():
    """VP reverse diffusion is (2 - sqrt(1 - beta)) x + beta score (+ sqrt(beta) z); the
    ancestral mean and variance are DDPM's posterior (eq. 7) at Tweedie's x0_hat."""
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (5, 3))
    score = jax.random.normal(jax.random.PRNGKey(1), (5, 3))
    ab_c, ab_n = jnp.full((5,), 0.6), jnp.full((5,), 0.62)
    step = sde_samplers.step_of_alpha_bars(ab_c, ab_n)
    beta = 1 - 0.6 / 0.62
    _, mean = sde_samplers.reverse_diffusion_update(x, score, step, key)
    np.testing.assert_allclose(mean, (2 - np.sqrt(1 - beta)) * x + beta * score, rtol=1e-5)
    sample, mean = sde_samplers.ancestral_update(x, score, step, key)
    x0_hat = (x + 0.4 * score) / np.sqrt(0.6)
    ddpm_mean, ddpm_var = process.q_posterior_mean_variance(x0_hat, x, ab_c, ab_n)
    np.testing.assert_allclose(mean, ddpm_mean, rtol=1e-5, atol=1e-6)
    noise = jax.random.normal(key, x.shape)
    np.testing.assert_allclose(sample, ddpm_mean + jnp.sqrt(ddpm_var) * noise, rtol=1e-5)
    # VE: r = 1, G^2 = sigma_cur^2 - sigma_nxt^2.
    ve = sde_lib.VESDE()
    t_c, t_n = jnp.full((5,), 0.5), jnp.full((5,), 0.45)
    _, mean = sde_samplers.reverse_diffusion_update(
        x, score, sde_samplers.step_of_sde(ve, t_c, t_n), key
    )
    g2 = ve.sigma(0.5) ** 2 - ve.sigma(0.45) ** 2
    np.testing.assert_allclose(mean, x + g2 * score, rtol=1e-5)


@pytest.mark.parametrize(
    "sampler,kw",
    [
        ("euler_maruyama", {}),
        ("pc", {}),
        ("pc", {"snr": 0.1, "corrector_steps": 2}),
        ("ode", {}),
    ],
)
def test_samplers_sample_entries_recover_the_mixture(sampler, kw):
    """The lab's DDPM eps-model through samplers.sample, as the other samplers take it."""
    s = schedules.get_schedule("linear", 1000)
    model_fn = analytic.gaussian_mixture_model_fn(s, MEANS, STDS, WEIGHTS)
    steps = None if sampler == "ode" else 300
    run = jax.jit(
        lambda k: samplers.sample(
            model_fn, s, (N, 2), k, sampler=sampler, num_steps=steps, clip_x0=None, **kw
        )
    )
    out = run(jax.random.PRNGKey(0))
    assert (out.nfe is not None) == (sampler == "ode")
    assert_recovers_mixture(out.samples)


def test_ode_entry_on_cosine_schedule_matches_the_exact_flow():
    s = schedules.get_schedule("cosine", 1000)
    mean, std = 0.5, 0.3
    model_fn = analytic.gaussian_model_fn(s, jnp.array([mean]), std)
    x_T = jax.random.normal(jax.random.PRNGKey(3), (1000, 1))
    out = jax.jit(
        lambda x: samplers.sample(model_fn, s, x.shape, KEY, sampler="ode", x_T=x, clip_x0=None)
    )(x_T)
    ab_T = float(s.alphas_cumprod[-1])
    z = (np.asarray(x_T) - np.sqrt(ab_T) * mean) / np.sqrt(ab_T * std**2 + 1 - ab_T)
    np.testing.assert_allclose(np.asarray(out.samples), mean + std * z, atol=2e-3)


def test_bad_options_are_named():
    s = schedules.get_schedule("linear", 100)
    model_fn = analytic.gaussian_model_fn(s, jnp.zeros(1), 1.0)
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="sample.num_steps"):
        samplers.sample(model_fn, s, (2, 1), key, sampler="ode", num_steps=10)
    with pytest.raises(ValueError, match="sample.predictor"):
        samplers.sample(model_fn, s, (2, 1), key, sampler="pc", predictor="heun")
    with pytest.raises(ValueError, match="sample.solver"):
        samplers.sample(model_fn, s, (2, 1), key, sampler="ode", solver="rk4")
    with pytest.raises(ValueError, match="sample.eps"):
        sde_samplers.sde_sample(lambda x, t: x, sde_lib.VPSDE(), (2, 1), key, eps=0.0)
