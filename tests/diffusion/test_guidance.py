"""Guidance on an analytic class-conditional mixture: exact conditional and marginal scores."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax_lab.diffusion import analytic, guidance, samplers, schedules

MEANS = jnp.array([[-2.0, 0.0], [2.0, 1.0]])
STDS = jnp.array([0.3, 0.5])
WEIGHTS = jnp.array([0.3, 0.7])
NULL = 2
S = schedules.get_schedule("linear", 1000)


def apply_fn(x, t, y):
    """A 'network' with labels 0, 1 (one component each) and the null label 2 (the mixture)."""
    ab = S.alpha_bar_at(t)
    eps_k = [
        analytic.mixture_eps(x, ab, MEANS[k : k + 1], STDS[k : k + 1], jnp.ones(1))
        for k in range(2)
    ]
    eps_mix = analytic.mixture_eps(x, ab, MEANS, STDS, WEIGHTS)
    y = y[:, None]
    return jnp.where(y == 0, eps_k[0], jnp.where(y == 1, eps_k[1], eps_mix))


def _sample(model_fn, n=2000, seed=0, steps=100):
    fn = jax.jit(
        lambda k: (
            samplers.sample(
                model_fn, S, (n, 2), k, sampler="ddim", num_steps=steps, clip_x0=None
            ).samples
        )
    )
    return np.asarray(fn(jax.random.PRNGKey(seed)))


def _component(x):
    return np.argmin(((x[:, None] - np.asarray(MEANS)[None]) ** 2).sum(-1), axis=1)


def test_cfg_w0_is_plain_conditional_sampling():
    y = jnp.zeros((2000,), jnp.int32)
    cfg = guidance.classifier_free(apply_fn, {"y": y}, {"y": jnp.full_like(y, NULL)}, 0.0)
    plain = lambda x, t: apply_fn(x, t, y)
    np.testing.assert_allclose(_sample(cfg), _sample(plain), atol=1e-5)


def test_cfg_batched_pass_equals_two_passes():
    y = jnp.array([0, 1, 0, 1])
    null = jnp.full_like(y, NULL)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 2))
    t = jnp.full((4,), 0.4)
    w = 3.0
    batched = guidance.classifier_free(apply_fn, {"y": y}, {"y": null}, w)(x, t)
    separate = (1 + w) * apply_fn(x, t, y) - w * apply_fn(x, t, null)
    np.testing.assert_allclose(batched, separate, rtol=1e-6, atol=1e-6)


def test_cfg_strengthens_the_condition():
    y = jnp.ones((2000,), jnp.int32)
    cfg = guidance.classifier_free(apply_fn, {"y": y}, {"y": jnp.full_like(y, NULL)}, 3.0)
    x = _sample(cfg)
    assert np.mean(_component(x) == 1) > 0.99
    # Guidance sharpens: the guided component is narrower than the data's 0.5.
    assert float(x[_component(x) == 1].std(0).mean()) < 0.5


def _log_prob(x, t, y):
    """The exact noisy classifier log p(y | x_t) of the mixture."""
    logr = analytic.mixture_log_responsibilities(x, S.alpha_bar_at(t), MEANS, STDS, WEIGHTS)
    return jnp.take_along_axis(logr, y[:, None], axis=1)[:, 0]


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_classifier_guidance(prediction):
    uncond_eps = lambda x, t: apply_fn(x, t, jnp.full((x.shape[0],), NULL))
    if prediction == "v":  # the same model expressed as a v-predictor
        from diffax_lab.diffusion import process

        def uncond(x, t):
            ab = S.alpha_bar_at(t)
            eps = uncond_eps(x, t)
            return process.v_from_eps_x0(eps, process.predict_x0_from_eps(x, eps, ab), ab)
    else:
        uncond = uncond_eps
    y = jnp.zeros((2000,), jnp.int32)  # ask for the minority component (30%)

    def run(scale):
        fn = guidance.classifier_guided(uncond, _log_prob, y, S, scale, prediction)
        out = jax.jit(
            lambda k: (
                samplers.sample(
                    fn,
                    S,
                    (2000, 2),
                    k,
                    sampler="ddim",
                    num_steps=100,
                    prediction=prediction,
                    clip_x0=None,
                ).samples
            )
        )
        return np.asarray(out(jax.random.PRNGKey(0)))

    plain = jax.jit(
        lambda k: (
            samplers.sample(
                uncond,
                S,
                (2000, 2),
                k,
                sampler="ddim",
                num_steps=100,
                prediction=prediction,
                clip_x0=None,
            ).samples
        )
    )
    np.testing.assert_allclose(run(0.0), np.asarray(plain(jax.random.PRNGKey(0))), atol=1e-4)
    frac0 = np.mean(_component(run(0.0)) == 0)
    assert frac0 == pytest.approx(0.3, abs=0.04)
    # s = 1 with the exact classifier is exact conditional sampling (Bayes' rule for scores).
    x1 = run(1.0)
    assert np.mean(_component(x1) == 0) > 0.98
    np.testing.assert_allclose(x1.mean(0), np.asarray(MEANS[0]), atol=0.05)
    np.testing.assert_allclose(x1.std(0), 0.3, rtol=0.08)
