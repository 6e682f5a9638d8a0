"""Guidance as model wrappers: each returns a ``model_fn(x_t, t)`` that any sampler takes.

- Classifier-free guidance (Ho & Salimans 2022): eps = (1 + w) eps_cond - w eps_uncond,
  with the conditional and unconditional halves in one batched forward pass. In the
  ``guidance_scale`` convention of other libraries (diffusers, the DLI course's
  eps_uncond + s (eps_cond - eps_uncond)), s = 1 + w: w = 0 (s = 1) is plain conditional
  sampling. The combination is linear, so it applies to eps, x0 and v outputs alike.
- Classifier guidance (Dhariwal & Nichol 2021, Algorithm 2 / eq. 14):
  eps_hat = eps - s sqrt(1 - abar) grad_x log p(y | x_t).

Not for: networks or training (the null label is trained by dropping labels in the step).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffax_lab.diffusion import process
from diffax_lab.diffusion.schedules import DiscreteSchedule


def classifier_free(apply_fn, cond: dict, null_cond: dict, guidance_scale: float):
    """model_fn for CFG with weight w.

    ``apply_fn(x, t, **cond) -> output``; ``cond`` and ``null_cond`` map the same keyword
    names (``y``, or ``cond`` and ``cond_mask``) to [B, ...] arrays for the conditional and
    the unconditional pass. Both passes run as one batch of 2B.
    """
    if set(cond) != set(null_cond):
        raise ValueError(f"cond {sorted(cond)} and null_cond {sorted(null_cond)} differ.")
    w = guidance_scale

    def model_fn(x, t):
        both = {k: jnp.concatenate([cond[k], null_cond[k]]) for k in cond}
        out = apply_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), **both)
        out_cond, out_uncond = jnp.split(out, 2)
        return (1.0 + w) * out_cond - w * out_uncond

    return model_fn


def classifier_guided(
    model_fn, log_prob_fn, y, schedule: DiscreteSchedule, scale: float, prediction: str = "eps"
):
    """model_fn whose eps is shifted by the gradient of a classifier on noisy inputs.

    ``log_prob_fn(x_t, t, y) -> [B]`` is log p(y | x_t) of a noise-conditioned classifier.
    The wrapper returns the same kind of output (``prediction``) as ``model_fn``.
    """

    def model_fn_guided(x, t):
        ab = schedule.alpha_bar_at(t)
        out = model_fn(x, t).astype(jnp.float32)
        x0_hat, eps = process.to_x0_and_eps(prediction, out, x, ab)
        grad = jax.grad(lambda x: jnp.sum(log_prob_fn(x, t, y)))(x)
        eps = eps - scale * process.expand_to(jnp.sqrt(1.0 - ab), x) * grad
        x0_hat = process.predict_x0_from_eps(x, eps, ab)
        return process.target_for(prediction, x0_hat, eps, ab)

    return model_fn_guided
