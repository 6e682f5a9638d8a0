import jax.numpy as jnp
import numpy as np
import pytest

from diffax_lab.diffusion import schedules


def test_linear_t1000_alpha_bar_end():
    s = schedules.get_schedule("linear", 1000)
    assert s.betas[0] == pytest.approx(1e-4)
    assert s.betas[-1] == pytest.approx(0.02)
    # prod_{t=1}^{1000} (1 - beta_t) with beta linear from 1e-4 to 0.02.
    assert float(s.alphas_cumprod[-1]) == pytest.approx(4.04e-5, rel=0.01)


def test_linear_other_T_keeps_total_noise():
    s100 = schedules.get_schedule("linear", 100)
    s1000 = schedules.get_schedule("linear", 1000)
    assert s100.num_steps == 100
    np.testing.assert_allclose(
        float(s100.alphas_cumprod[-1]), float(s1000.alphas_cumprod[-1]), rtol=0.6
    )  # same order: beta scaled by 1000 / T


def test_cosine_matches_paper_definition():
    T = 1000
    s = schedules.get_schedule("cosine", T)
    f = lambda t: np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2
    t = np.arange(1, T + 1) / T
    expected = f(t) / f(0.0)
    # Interior steps are unclipped, so abar_t equals f(t)/f(0) there (eq. 17).
    np.testing.assert_allclose(np.asarray(s.alphas_cumprod)[: T - 5], expected[: T - 5], rtol=1e-4)
    assert float(jnp.max(s.betas)) == pytest.approx(0.999)  # the clip at t = T
    ab = schedules.continuous_alpha_bar("cosine")
    assert ab(0.0) == pytest.approx(1.0)
    assert ab(1.0) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("name", schedules.SCHEDULES)
@pytest.mark.parametrize("T", [100, 1000])
def test_snr_strictly_decreasing(name, T):
    s = schedules.get_schedule(name, T)
    log_snr = np.asarray(s.log_snr)
    assert np.all(np.diff(log_snr) < 0)
    assert np.all(np.asarray(s.betas) > 0) and np.all(np.asarray(s.betas) <= 0.999)
    np.testing.assert_allclose(np.asarray(s.snr), np.exp(log_snr), rtol=1e-4)


def test_posterior_coefficients_consistent():
    s = schedules.get_schedule("linear", 1000)
    # beta_tilde = coef1^2 / (SNR_{t-1} - SNR_t) identity for t >= 2.
    coef1 = np.asarray(s.posterior_mean_coef1, np.float64)[1:]
    snr = np.asarray(s.snr, np.float64)
    np.testing.assert_allclose(
        np.asarray(s.posterior_variance)[1:], coef1**2 / (snr[:-1] - snr[1:]), rtol=2e-3
    )
    assert float(s.posterior_variance[0]) == 0.0


@pytest.mark.parametrize("name", schedules.SCHEDULES)
def test_continuous_view(name):
    s = schedules.get_schedule(name, 1000)
    # Exact at the grid.
    np.testing.assert_allclose(np.asarray(s.log_snr_at(s.times)), np.asarray(s.log_snr), atol=1e-4)
    # Decreasing over all of [0, 1], including before the first step.
    t = jnp.linspace(0.0, 1.0, 4097)
    assert np.all(np.diff(np.asarray(s.log_snr_at(t))) < 0)
    # The analytic continuous alpha_bar agrees with the discrete arrays (not the clipped end);
    # for linear the discrete product differs from the limit by sum(beta^2)/2 in log space.
    ab = schedules.continuous_alpha_bar(name, 1000)(np.asarray(s.times, np.float64))
    np.testing.assert_allclose(
        np.log(np.asarray(s.alphas_cumprod, np.float64))[:900],
        np.log(ab[:900]),
        rtol=0.02,
        atol=1e-4,
    )


def test_respace_keeps_alpha_bar():
    s = schedules.get_schedule("cosine", 1000)
    idx = schedules.spaced_indices(1000, 50)
    r = s.respace(idx)
    assert r.num_steps == 50 and idx[0] == 0 and idx[-1] == 999
    np.testing.assert_allclose(
        np.asarray(r.alphas_cumprod), np.asarray(s.alphas_cumprod)[idx], rtol=1e-5
    )
    np.testing.assert_allclose(
        np.cumprod(1 - np.asarray(r.betas, np.float64)),
        np.asarray(r.alphas_cumprod),
        rtol=1e-4,
        atol=1e-10,
    )
    q = schedules.spaced_indices(1000, 30, "quadratic")
    assert len(q) == 30 and np.all(np.diff(q) > 0)


def test_bad_schedule_arguments_name_the_field():
    with pytest.raises(ValueError, match="diffusion.schedule"):
        schedules.get_schedule("quartic", 10)
    with pytest.raises(ValueError, match="diffusion.num_timesteps"):
        schedules.get_schedule("linear", 0)
    # T = 20 would end at beta = 1 (alpha_bar = 0): refused, with the smallest T that works.
    with pytest.raises(ValueError, match=r"diffusion.num_timesteps=20 .* at least 21 steps"):
        schedules.get_schedule("linear", 20)
    assert float(schedules.get_schedule("linear", 21).alphas_cumprod[-1]) > 0.0
    with pytest.raises(ValueError, match="sample.num_steps"):
        schedules.spaced_indices(10, 11)
