"""The edm task (configs/edm.py): its sigma grid, the denoiser as the samplers see it, the
registered EDM sampler, VE training, the config checks, and a tiny run that trains and
samples with the deterministic EDM sampler, DDIM and the probability-flow ODE."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax_lab import config_lib
from diffax_lab.diffusion import edm, samplers
from diffax_lab.errors import ConfigError
from diffax_lab.sharding import make_mesh
from diffax_lab.tasks import registry
from diffax_lab.tasks.edm import sigma_schedule
from tests.helpers import SMALL_UNET

S2 = 0.36  # data ~ N(0, S2 I)


def edm_config(arg="tiny", **overrides):
    return config_lib.apply_overrides(config_lib.load_config(f"configs/edm.py:{arg}"), overrides)


def gaussian_denoiser(x, sigma):
    """D(x; sigma) = E[x0 | x0 + sigma n] for x0 ~ N(0, S2 I)."""
    return x * (S2 / (S2 + jnp.square(sigma)))[:, None]


def test_sigma_grid_is_geometric_over_edm_range():
    sched = sigma_schedule(0.002, 80.0, 50)
    ab = np.asarray(sched.alphas_cumprod, np.float64)
    sigmas = np.sqrt((1 - ab) / ab)
    np.testing.assert_allclose(sigmas[[0, -1]], [0.002, 80.0], rtol=1e-2)
    ratios = sigmas[1:] / sigmas[:-1]
    np.testing.assert_allclose(ratios, (80.0 / 0.002) ** (1 / 49), rtol=1e-2)
    np.testing.assert_allclose(edm.schedule_sigma_range(sched), (0.002, 80.0), rtol=1e-2)


def test_the_task_network_at_time_t_is_the_denoiser_at_its_sigma():
    """model_fn's x0 at a VP state x_t equals the VP posterior mean when D is exact."""
    task = registry.build(edm_config(), make_mesh(1))
    fn = task.x0_at_time(gaussian_denoiser)
    t = jnp.asarray([0.01, 0.3, 0.7, 1.0])
    x_t = jax.random.normal(jax.random.PRNGKey(0), (4, 3))
    ab = task.schedule.alpha_bar_at(t)[:, None]
    posterior = jnp.sqrt(ab) * S2 * x_t / (ab * S2 + 1 - ab)
    np.testing.assert_allclose(fn(x_t, t), posterior, rtol=1e-4, atol=1e-6)


def test_ve_denoiser_and_loss_of_the_ideal_network():
    """VE: D = x + sigma F(x, ln(sigma) / 4), and the task's loss (denoising score matching,
    lambda = sigma^2, sigma uniform over the geometric levels) of the ideal network for
    Gaussian data is its closed form mean_sigma S2 / (S2 + sigma^2)."""
    task = registry.build(edm_config("tiny,ve"), make_mesh(1))
    sigma = jnp.asarray([0.01, 1.0, 50.0])
    x = jnp.ones((3, 2))
    d = task.denoiser_fn(lambda x_in, c_noise: jnp.broadcast_to(c_noise[:, None], x_in.shape))
    expected = jnp.broadcast_to(1 + (sigma * jnp.log(sigma) / 4)[:, None], x.shape)
    np.testing.assert_allclose(d(x, sigma), expected, rtol=1e-6)

    def ideal(x_in, c_noise):  # sigma * exact score of N(0, (S2 + sigma^2) I)
        sig = jnp.exp(4.0 * c_noise)[:, None]
        return -sig * x_in / (S2 + jnp.square(sig))

    x0 = jnp.sqrt(S2) * jax.random.normal(jax.random.PRNGKey(1), (20_000, 4))
    loss, _ = jax.jit(lambda x0, k: task.loss_fn(ideal, x0, k))(x0, jax.random.PRNGKey(2))
    levels = task.ve_sde.discrete_sigmas(task.config.diffusion.num_scales)
    assert float(loss) == pytest.approx(np.mean(S2 / (S2 + levels**2)), rel=0.05)


def test_registered_edm_sampler_is_heun_without_churn_and_samples_with_churn():
    """sampler='edm' at S_churn = 0 is Algorithm 1 = the registered karras 'heun' on the
    same grid; with churn (Algorithm 2) it still draws N(0, S2) from the exact denoiser."""
    sched = sigma_schedule(0.002, 80.0, 100)

    def model_fn(x_t, t):  # exact x0 of the VP state
        ab = sched.alpha_bar_at(t)[:, None]
        return jnp.sqrt(ab) * S2 * x_t / (ab * S2 + 1 - ab)

    def run(sampler, **kw):
        return samplers.sample(
            model_fn, sched, (2000, 2), jax.random.PRNGKey(0), sampler=sampler,
            num_steps=12, prediction="x0", clip_x0=None, **kw,
        )  # fmt: skip

    heun, det = run("heun"), run("edm")
    np.testing.assert_allclose(det.samples, heun.samples, rtol=1e-4, atol=1e-4)
    assert det.nfe == 23
    kw = dict(S_churn=40.0, S_tmin=0.05, S_tmax=50.0, S_noise=1.003)
    churn = run("edm", **kw)
    assert not np.allclose(churn.samples, det.samples)
    # The same as edm.sample (Algorithm 2) on the schedule's sigma range, from the same noise.
    init_key, loop_key = jax.random.split(jax.random.PRNGKey(0))
    x_T = jax.random.normal(init_key, (2000, 2)) * np.sqrt(1 + 80.0**2)
    s_min, s_max = edm.schedule_sigma_range(sched)
    direct = edm.sample(
        gaussian_denoiser, (2000, 2), loop_key, num_steps=12, sigma_min=s_min,
        sigma_max=s_max, x_T=x_T * np.sqrt((1 + s_max**2) / (1 + 80.0**2)), **kw,
    )  # fmt: skip
    np.testing.assert_allclose(churn.samples, direct.samples, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("arg", ["", "tiny", "cpu", "ve", "cpu,ve"])
def test_every_variant_passes_its_checks(arg):
    config = edm_config(arg)
    assert registry.check_config(config).name == "edm"
    assert config.diffusion.preconditioning == ("ve" if "ve" in arg else "edm")


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"diffusion.prediction": "eps"}, "diffusion.prediction"),
        ({"diffusion.preconditioning": "vp"}, "diffusion.preconditioning"),
        ({"diffusion.sigma_max": 0.001}, "diffusion.sigma_max"),
        ({"diffusion.num_scales": 1}, "diffusion.num_scales"),
        ({"sample.classifier_scale": 1.0, "sample.classifier_workdir": "x"}, "classifier_scale"),
    ],
)
def test_bad_edm_fields_are_named(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        registry.check_config(edm_config(**overrides))


@pytest.mark.slow
def test_edm_task_trains_and_samples_with_edm_ddim_and_ode(tiny_data, tmp_path):
    from diffax_lab.modes import train

    config = edm_config(
        **SMALL_UNET,
        **{
            "data.dir": str(tiny_data),
            "data.num_examples": 0,
            "train.num_steps": 2,
            "train.sample_every": 0,
            "model.base_channels": 8,
            "sample.num": 2,
            "sample.batch_size": 2,
        },
    )
    workdir = str(tmp_path / "edm")
    train.run(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        losses = [json.loads(x)["loss"] for x in f if '"loss"' in x]
    assert losses and all(np.isfinite(losses))
    task, params = registry.restore_run(workdir, make_mesh(1), "workdir")
    assert task.name == "edm"
    for sampler, steps in (("edm", 3), ("ddim", 3), ("ode", 0)):
        c = config_lib.apply_overrides(
            task.config,
            {"sample.sampler": sampler, "sample.num_steps": steps, "sample.rtol": 1e-2,
             "sample.atol": 1e-2},
        )  # fmt: skip
        x, _, _ = registry.build(c, make_mesh(1)).generate(params, 2, jax.random.PRNGKey(0))
        assert x.shape == (2, *task.image_shape), sampler
        assert np.isfinite(x).all() and np.abs(x).max() <= 1.0 + 1e-5, sampler
