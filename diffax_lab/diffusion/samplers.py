"""Samplers: one compiled loop, many update rules chosen by name.

A sampler is one function registered with ``@register_sampler(name)``: it maps
(x_t, x0_hat, eps_hat, alpha_bar_t, alpha_bar_prev, key) to x_prev. ``sample`` runs it over
any increasing subset of the schedule's steps inside one ``lax.scan``, so a whole sampling
run is a single XLA program and a new sampler needs no new loop.

``model_fn(x_t, t) -> output`` is the network bound to its parameters and condition,
with ``t`` the continuous time [B] of ``schedules.py``; ``prediction`` says what it returns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffax_lab.diffusion import process
from diffax_lab.diffusion.schedules import DiscreteSchedule, spaced_indices

SAMPLERS: dict[str, Callable] = {}
VARIANCES = ("beta", "beta_tilde")


def register_sampler(name: str):
    def wrap(fn):
        if name in SAMPLERS:
            raise ValueError(f"Sampler {name!r} is registered twice.")
        SAMPLERS[name] = fn
        return fn

    return wrap


class SampleOutput(NamedTuple):
    samples: jnp.ndarray  # [B, ...] the final x_0
    trajectory: jnp.ndarray | None  # [N, B, ...] x_t fed to the network at N chosen steps
    trajectory_times: np.ndarray | None  # [N] continuous time of each trajectory frame


@register_sampler("ddpm")
def ddpm_step(x_t, x0_hat, eps_hat, ab_t, ab_prev, key, *, variance="beta_tilde"):
    """Ancestral step of Ho et al. (2020), Algorithm 2, written through the posterior.

    The mean is the posterior mean of q(x_prev | x_t, x0_hat) (eqs. 7 and 11 agree for an
    eps model); the variance is beta_t or beta_tilde_t (section 3.2). No noise at t = 1.
    """
    del eps_hat
    mean, posterior_var = process.q_posterior_mean_variance(x0_hat, x_t, ab_t, ab_prev)
    if variance == "beta":
        var = 1.0 - process.expand_to(ab_t / ab_prev, x_t)
    elif variance == "beta_tilde":
        var = posterior_var
    else:
        raise ValueError(f"sample.variance must be one of {VARIANCES}, got {variance!r}.")
    noise = jax.random.normal(key, x_t.shape, x_t.dtype)
    is_last = process.expand_to(ab_prev >= 1.0, x_t)
    return mean + jnp.where(is_last, 0.0, jnp.sqrt(var)) * noise


@register_sampler("ddim")
def ddim_step(x_t, x0_hat, eps_hat, ab_t, ab_prev, key, *, eta=0.0):
    """DDIM (Song et al. 2021, eq. 12); eta = 1 gives the DDPM posterior variance."""
    ab_t = process.expand_to(ab_t, x_t)
    ab_prev = process.expand_to(ab_prev, x_t)
    sigma2 = eta**2 * (1.0 - ab_prev) / (1.0 - ab_t) * (1.0 - ab_t / ab_prev)
    direction = jnp.sqrt(jnp.maximum(1.0 - ab_prev - sigma2, 0.0)) * eps_hat
    noise = jax.random.normal(key, x_t.shape, x_t.dtype)
    return jnp.sqrt(ab_prev) * x0_hat + direction + jnp.sqrt(sigma2) * noise


def sample(
    model_fn,
    schedule: DiscreteSchedule,
    shape,
    key,
    *,
    sampler: str = "ddpm",
    num_steps: int | None = None,
    spacing: str = "uniform",
    prediction: str = "eps",
    clip_x0: float | None = None,
    num_trajectory: int = 0,
    x_T=None,
    **sampler_kwargs,
) -> SampleOutput:
    """Draws samples of ``shape`` by running ``sampler`` from pure noise to t = 0.

    ``num_steps`` (default: all of the schedule's) picks a subset of steps by ``spacing``
    (timestep respacing, Nichol & Dhariwal 2021); ``clip_x0`` clips the predicted x_0 to
    [-clip_x0, clip_x0] before each update; ``num_trajectory`` > 0 also returns the x_t
    fed to the network at that many evenly spaced steps (the first is x_T). Call inside
    ``jax.jit`` (with ``model_fn`` and the keyword options static) to compile the loop once.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sample.sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}.")
    step_fn = SAMPLERS[sampler]
    T = schedule.num_steps
    indices = spaced_indices(T, T if num_steps is None else num_steps, spacing)
    sched = schedule.respace(indices) if len(indices) < T else schedule
    S = sched.num_steps
    ab = sched.alphas_cumprod
    ab_prev = sched.alphas_cumprod_prev
    batch = shape[0]

    init_key, loop_key = jax.random.split(key)
    x = jax.random.normal(init_key, shape, jnp.float32) if x_T is None else x_T
    # Trajectory slots: slot j records the input at loop position record_at[j] (0 = first).
    n_traj = min(num_trajectory, S)
    record_at = np.round(np.linspace(0, S - 1, n_traj)).astype(np.int64) if n_traj else None
    slot_of_position = np.full((S,), n_traj, np.int32)  # n_traj = "not recorded" (dropped)
    if n_traj:
        slot_of_position[record_at] = np.arange(n_traj, dtype=np.int32)
    traj = jnp.zeros((n_traj,) + tuple(shape), jnp.float32)

    def body(carry, k):
        x, traj = carry
        position = S - 1 - k  # 0 for the first (noisiest) step
        if n_traj:
            traj = traj.at[jnp.asarray(slot_of_position)[position]].set(x, mode="drop")
        t = jnp.full((batch,), sched.times[k])
        out = model_fn(x, t).astype(jnp.float32)
        ab_t = jnp.full((batch,), ab[k])
        ab_p = jnp.full((batch,), ab_prev[k])
        x0_hat, eps_hat = process.to_x0_and_eps(prediction, out, x, ab_t)
        if clip_x0 is not None:
            x0_hat = jnp.clip(x0_hat, -clip_x0, clip_x0)
            eps_hat = process.predict_eps_from_x0(x, x0_hat, ab_t)
        x = step_fn(
            x, x0_hat, eps_hat, ab_t, ab_p, jax.random.fold_in(loop_key, k), **sampler_kwargs
        )
        return (x, traj), None

    (x, traj), _ = jax.lax.scan(body, (x, traj), jnp.arange(S - 1, -1, -1))
    if not n_traj:
        return SampleOutput(x, None, None)
    times = np.asarray(sched.times)[::-1][record_at]
    return SampleOutput(x, traj, times)
