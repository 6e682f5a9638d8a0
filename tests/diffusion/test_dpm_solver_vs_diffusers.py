"""DPM-Solver++(2M) against diffusers' DPMSolverMultistepScheduler on an exact Gaussian target.

Both solve the probability-flow ODE of Gaussian data N(0.5, 0.3^2) from the same x_T, driven
by its exact optimal eps-predictor, so the only error is the solver's; the exact solution is
known in closed form (tests/diffusion/test_samplers.py). diffusers runs through the same
function as the diffusers rows of benchmarks/sampler_errors.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.sampler_errors import diffusers_dpm_solver
from diffax_lab.diffusion import analytic, samplers, schedules
from tests.diffusion.test_samplers import exact_ode_solution

MEAN, STD, NUM = 0.5, 0.3, 4000
# How far the two float32 runs may drift apart (absolute on x_0, and relative on the error).
# The cosine schedule's last alpha_bar is 2.4e-9 (beta clipped at 0.999), so the first
# x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) cancels ~4 digits; the runs then differ by
# ~2e-4, and their errors by ~0.1%, either way. The linear schedule's runs agree to ~1e-6.
TOLERANCE = {"linear": (1e-5, 1e-4), "cosine": (1e-3, 1e-2)}


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_dpm_solver_is_diffusers_default_on_the_default_grid(name):
    s = schedules.get_schedule(name, 1000)
    model_fn = analytic.gaussian_model_fn(s, jnp.array([MEAN]), STD)
    x_T = jax.random.normal(jax.random.PRNGKey(3), (NUM, 1))
    exact = exact_ode_solution(np.asarray(x_T), s, MEAN, STD)
    for steps in (10, 20):
        ours = np.asarray(
            jax.jit(
                lambda k, steps=steps: (
                    samplers.sample(
                        model_fn,
                        s,
                        (NUM, 1),
                        k,
                        sampler="dpm_solver++",
                        num_steps=steps,
                        x_T=x_T,
                        clip_x0=None,
                    ).samples
                )
            )(jax.random.PRNGKey(0))
        )
        theirs = diffusers_dpm_solver(model_fn, s, x_T, steps)
        atol, rtol = TOLERANCE[name]
        ours_err, theirs_err = np.abs(ours - exact).max(), np.abs(theirs - exact).max()
        assert ours_err <= theirs_err * (1 + rtol), (name, steps, ours_err, theirs_err)
        # The same algorithm on the same grid: equal up to float32 rounding.
        np.testing.assert_allclose(ours, theirs, atol=atol, err_msg=f"{name}, {steps} steps")
