"""The unCLIP prior: an exact prior on a synthetic embedding distribution recovers it
through the task's sampling path, a trained one learns it, and CFG with w = 0 is the
conditional prior."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax_lab import config_lib, sharding
from diffax_lab.tasks import registry

D, SIGMA = 3, 0.2
A = np.array([[1.0, 0.5, 0.0], [-0.3, 0.8, 0.2], [0.1, 0.0, -0.7]], np.float32)


def prior_task(**overrides):
    config = config_lib.load_config("prior.py:tiny")
    config = config_lib.apply_overrides(
        config,
        {
            "prior.dim": D,
            "model.cond_dim": D,
            "diffusion.num_timesteps": 100,
            "sample.num_steps": 0,
            "sample.sampler": "ddpm",
            "sample.batch_size": 1000,
            **overrides,
        },
    )
    return registry.check_config(config)(config, sharding.make_mesh(1))


class ExactLinearPrior:
    """E[v | z_t, u] for v | u ~ N(A u, sigma^2 I): the x0 prediction of a perfect prior."""

    def __init__(self, schedule):
        self.schedule = schedule

    def apply(self, variables, x, t, cond=None, cond_mask=None, **unused):
        mean = cond @ jnp.asarray(A).T
        ab = self.schedule.alpha_bar_at(t)[:, None]
        gain = jnp.sqrt(ab) * SIGMA**2 / (ab * SIGMA**2 + 1.0 - ab)
        return mean + gain * (x - jnp.sqrt(ab) * mean)


def regress(u, v):
    """Least squares v ~ u B^T: (B, residual std)."""
    b, *_ = np.linalg.lstsq(u, v, rcond=None)
    return b.T, float(np.std(v - u @ b))


def synthetic(n, seed):
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(n, D)).astype(np.float32)
    return u, (u @ A.T + SIGMA * rng.normal(size=(n, D))).astype(np.float32)


def test_exact_prior_recovers_the_linear_map_through_the_samplers():
    task = prior_task()
    task.model = ExactLinearPrior(task.schedule)
    u, _ = synthetic(1000, 0)
    v, _, _ = task.generate({}, len(u), jax.random.PRNGKey(0), labels=u)
    assert v.shape == (1000, D)
    b, resid = regress(u, np.asarray(v))
    np.testing.assert_allclose(b, A, atol=0.05)
    assert abs(resid - SIGMA) < 0.03


def test_prior_cfg_weight_zero_is_the_conditional_prior():
    task = prior_task(**{"prior.width": 16})
    params = task.init_params(jax.random.PRNGKey(0))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = jax.tree.unflatten(
        tree, [p + 0.3 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
    )
    u, v = synthetic(4, 1)
    t = jnp.full((4,), 0.5)
    plain = task.model_fn(params, u)(v, t)
    np.testing.assert_allclose(task.guided_model_fn(params, u, 0.0)(v, t), plain, atol=1e-6)
    assert not np.allclose(task.guided_model_fn(params, u, 1.0)(v, t), plain, atol=1e-4)


@pytest.mark.slow
def test_trained_prior_learns_the_linear_map():
    task = prior_task(
        **{
            "prior.width": 64,
            "prior.depth": 2,
            "train.batch_size": 256,
            "train.num_steps": 1500,
            "train.p_uncond": 0.0,
            "sample.guidance_scale": 0.0,
            "optim.lr": 3e-3,
            "optim.warmup_steps": 20,
            "optim.ema_decay": 0.95,
        }
    )
    u, v = synthetic(4096, 2)
    state = task.create_state()
    step = task.make_train_step(len(u), gather_in_step=True)
    data = (jax.device_put(v), jax.device_put(u))
    for _ in range(1500):
        state, _ = step(state, *data)
    test_u, _ = synthetic(1000, 3)
    out, _, _ = task.generate(state["ema_params"], 1000, jax.random.PRNGKey(0), labels=test_u)
    b, resid = regress(test_u, np.asarray(out))
    np.testing.assert_allclose(b, A, atol=0.15)
    assert abs(resid - SIGMA) < 0.1
