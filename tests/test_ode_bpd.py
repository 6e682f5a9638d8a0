"""The ode_bpd evaluator: bits/dim by the probability-flow ODE for a DDPM-trained model (as
the VP-SDE of its schedule) and, through the edm task's likelihood_sde, for EDM's denoiser."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax_lab import config_lib
from diffax_lab.diffusion import edm
from diffax_lab.errors import ConfigError
from diffax_lab.evaluators import Context, ode_bpd
from diffax_lab.metrics.ode_likelihood import ode_log_likelihood
from diffax_lab.sharding import make_mesh
from diffax_lab.tasks import registry

S2 = 0.25  # data ~ N(0, S2 I)


def test_edm_likelihood_sde_gives_the_exact_gaussian_likelihood():
    """With the network that makes EDM's D the exact posterior mean of Gaussian data, the
    task's VE probability-flow ODE gives log N(x; 0, (S2 + sigma(eps)^2) I) within 1%."""
    config = config_lib.load_config("configs/edm.py:tiny")
    task = registry.build(config, make_mesh(1))
    sigma_data = config.diffusion.sigma_data

    def ideal_net(x_in, c_noise):
        sigma = jnp.exp(4.0 * c_noise)[:, None]
        c_skip, c_out, c_in, _ = edm.preconditioning(sigma, sigma_data)
        x = x_in / c_in
        return (S2 / (S2 + jnp.square(sigma)) * x - c_skip * x) / c_out

    task.net_fn = lambda params, cond=None, **kw: ideal_net
    sde, score_fn = task.likelihood_sde()
    x = jnp.sqrt(S2) * jax.random.normal(jax.random.PRNGKey(0), (8, 6))
    eps = 1e-3
    out = ode_log_likelihood(
        score_fn, sde, x, jax.random.PRNGKey(1), score_args=(None, None), num_probes=2,
        eps=eps, rtol=1e-5, atol=1e-5,
    )  # fmt: skip
    var = S2 + float(sde.sigma(eps)) ** 2
    exact = -0.5 * np.sum(np.asarray(x) ** 2, axis=1) / var - 3.0 * np.log(2 * np.pi * var)
    np.testing.assert_allclose(out.log_likelihood, exact, rtol=0.01)
    assert np.all(np.isfinite(out.stderr))


def test_bad_ode_fields_are_named():
    for field, value in (("ode_probe", "sphere"), ("ode_probes", 0), ("ode_rtol", 0.0)):
        config = config_lib.load_config("configs/ddpm.py:tiny")
        c = config_lib.apply_overrides(config, {f"eval.{field}": value})
        with pytest.raises(ConfigError, match=f"eval.{field}"):
            ode_bpd.check_fields(c)


@pytest.mark.slow
def test_ode_bpd_of_the_tiny_ddpm_run_is_finite_with_errors_and_nfe(tiny_run):
    _, workdir = tiny_run
    task, params = registry.restore_run(workdir, make_mesh(1), "workdir")
    overrides = {
        "eval.ode_num_examples": 2,
        "eval.batch_size": 2,
        "eval.ode_probes": 2,
        "eval.ode_rtol": 1e-2,
        "eval.ode_atol": 1e-2,
    }
    task = registry.build(config_lib.apply_overrides(task.config, overrides), make_mesh(1))
    evaluator = ode_bpd.Evaluator(task, workdir, metrics=("ode_bpd",))
    evaluator.prepare()
    report = evaluator.run(Context(task, params, jax.random.PRNGKey(0)))
    assert report["ode_sde"] == "VPSDE" and report["ode_num_examples"] == 2
    # An untrained-ish model of 8-bit images: finite and above 0, with both errors and NFE.
    assert np.isfinite(report["ode_bpd"]) and report["ode_bpd"] > 0
    assert np.isfinite(report["ode_bpd_sem"]) and np.isfinite(report["ode_bpd_hutchinson_sem"])
    assert report["ode_nfe"] >= 7
