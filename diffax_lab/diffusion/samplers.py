"""Samplers: one compiled loop, many update rules chosen by name.

A sampler is one function registered with ``@register_sampler(name, grid=...)``::

    step(denoise, x, carry, cur, nxt, key, **options) -> (x_next, carry)

where ``denoise(x, t) -> (x0_hat, eps_hat)`` evaluates the network (any prediction type,
clipping and guidance already applied), and ``cur`` / ``nxt`` are ``GridPoint``s: the
continuous time ``t`` and ``alpha_bar`` of the current and the next (less noisy) point.
The last ``nxt`` is always t = 0, alpha_bar = 1. ``sample`` runs the step over the grid in
one ``lax.scan``, so a whole sampling run is one XLA program and a new sampler is one
function. Grids: ``discrete`` (any subset of the schedule's steps, timestep respacing as in
Nichol & Dhariwal 2021), ``discrete_skip_step0`` (the same without step 0, so that the last
step goes from about t = 1 / num_steps straight to t = 0; see ``discrete_grid``) or
``karras`` (the sigma schedule of Karras et al. 2022, eq. 5).
A sampler registered with ``grid="adaptive"`` (the probability-flow ODE with an adaptive
solver, ``sde_samplers.py``) chooses its own steps, so it cannot be a step of the fixed scan:
it is registered as the whole run, ``run(denoise, schedule, x_T, key, **options) -> (x_0,
nfe)``, and ``sample`` calls it with the same arguments as any other sampler.
A sampler registered with ``grid="run"`` (EDM's Algorithm 2, ``edm.py``) is also a whole
run, ``run(denoise, schedule, x_T, key, num_steps, **options) -> (x_0, nfe)``, on a fixed
number of steps of its own grid (``num_steps`` positional, so it is not read from the
sample section as an option); it records no trajectory.

``model_fn(x_t, t) -> output`` is the network bound to its parameters and condition, with
``t`` the continuous time [B] of ``schedules.py``; ``prediction`` says what it returns.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffax_lab.diffusion import process
from diffax_lab.diffusion.schedules import DiscreteSchedule, spaced_indices

SAMPLERS: dict[str, Callable] = {}
SAMPLER_GRIDS: dict[str, str] = {}
GRIDS = ("discrete", "discrete_skip_step0", "karras", "adaptive", "run")
VARIANCES = ("beta", "beta_tilde")
KARRAS_RHO = 7.0
# The one set of sampling defaults: ``sample`` below and the ``sample`` section of
# configs/ddpm.py (the command line) both take these. Data lives in [-1, 1], so the predicted
# x_0 is clipped there; DDPM's reverse variance is beta_t (Ho et al. 2020, sec. 3.2: the
# better choice for data that is not a single point). Analytic targets outside [-1, 1] pass
# ``clip_x0=None``.
DEFAULTS = {
    "sampler": "ddpm",
    "num_steps": 0,
    "spacing": "uniform",
    "variance": "beta",
    "eta": 0.0,
    "clip_x0": 1.0,
}


class GridPoint(NamedTuple):
    t: jnp.ndarray  # [B] continuous time
    alpha_bar: jnp.ndarray  # [B]


class SampleOutput(NamedTuple):
    samples: jnp.ndarray  # [B, ...] the final x_0
    trajectory: jnp.ndarray | None  # [N, B, ...] x_t fed to the network at N chosen steps
    trajectory_times: np.ndarray | None  # [N] continuous time of each trajectory frame
    # Network evaluations where the sampler reports them (adaptive solvers: a traced scalar;
    # sde_samplers.sde_sample and edm.sample: an int); None for the fixed-grid steps of
    # ``sample``, which take num_steps times their evaluations per step.
    nfe: jnp.ndarray | int | None = None


def sampler_options(name: str) -> tuple[str, ...]:
    """The keyword-only options of sampler ``name``: the fields of a config's ``sample``
    section with these names are passed to it (``--config.sample.eta=0.5`` for DDIM)."""
    params = inspect.signature(SAMPLERS[name]).parameters.values()
    return tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY)


def register_sampler(name: str, grid: str = "discrete"):
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}.")

    def wrap(fn):
        if name in SAMPLERS:
            raise ValueError(f"Sampler {name!r} is registered twice.")
        SAMPLERS[name], SAMPLER_GRIDS[name] = fn, grid
        return fn

    return wrap


# ---------------------------------------------------------------- update rules


@register_sampler("ddpm")
def ddpm_step(denoise, x, carry, cur, nxt, key, *, variance=DEFAULTS["variance"]):
    """Ancestral step of Ho et al. (2020), Algorithm 2, written through the posterior.

    The mean is the posterior mean of q(x_prev | x_t, x0_hat) (eqs. 7 and 11 agree for an
    eps model); the variance is beta_t or beta_tilde_t (section 3.2). No noise at t = 0.
    """
    x0_hat, _ = denoise(x, cur.t)
    mean, posterior_var = process.q_posterior_mean_variance(x0_hat, x, cur.alpha_bar, nxt.alpha_bar)
    if variance == "beta":
        var = 1.0 - process.expand_to(cur.alpha_bar / nxt.alpha_bar, x)
    elif variance == "beta_tilde":
        var = posterior_var
    else:
        raise ValueError(f"sample.variance must be one of {VARIANCES}, got {variance!r}.")
    noise = jax.random.normal(key, x.shape, x.dtype)
    is_last = process.expand_to(nxt.alpha_bar >= 1.0, x)
    return mean + jnp.where(is_last, 0.0, jnp.sqrt(var)) * noise, carry


def ddim_update(x0_hat, eps_hat, ab_t, ab_prev, key, eta):
    """DDIM (Song et al. 2021, eq. 12); eta = 1 gives the DDPM posterior variance."""
    ab_t = process.expand_to(ab_t, x0_hat)
    ab_prev = process.expand_to(ab_prev, x0_hat)
    sigma2 = eta**2 * (1.0 - ab_prev) / (1.0 - ab_t) * (1.0 - ab_t / ab_prev)
    direction = jnp.sqrt(jnp.maximum(1.0 - ab_prev - sigma2, 0.0)) * eps_hat
    noise = jax.random.normal(key, x0_hat.shape, x0_hat.dtype)
    return jnp.sqrt(ab_prev) * x0_hat + direction + jnp.sqrt(sigma2) * noise


@register_sampler("ddim")
def ddim_step(denoise, x, carry, cur, nxt, key, *, eta=0.0):
    x0_hat, eps_hat = denoise(x, cur.t)
    return ddim_update(x0_hat, eps_hat, cur.alpha_bar, nxt.alpha_bar, key, eta), carry


def _half_lambda(alpha_bar):
    """lambda = log(alpha / sigma) = log-SNR / 2 (DPM-Solver's notation)."""
    return 0.5 * (jnp.log(alpha_bar) - jnp.log1p(-alpha_bar))


@register_sampler("dpm_solver++", grid="discrete_skip_step0")
def dpm_solver_pp_2m_step(denoise, x, carry, cur, nxt, key):
    """DPM-Solver++(2M), Lu et al. (2022), Algorithm 2 (data prediction, multistep).

    carry = (x0 of the previous step, its step size h, whether one exists). The first step
    is first order (DDIM), and so is the last, which lands on x0_hat itself: Lu et al.'s
    lower-order final step, which diffusers' DPMSolverMultistepScheduler takes at any number
    of steps when its final sigma is zero (its default). Its grid leaves out step 0, as
    diffusers' does: with step 0 kept, the step onto it is several times longer in
    log-SNR than the one before (h = 2.9 after 0.66 at 20 uniform steps of the linear
    schedule), too long for the second-order extrapolation, and the network evaluation
    there (alpha_bar = 0.9999) is all but wasted. With this grid the solver is diffusers'
    default algorithm (tests/diffusion/test_dpm_solver_vs_diffusers.py).
    """
    del key
    x0_prev, h_prev, has_prev = carry
    x0_hat, _ = denoise(x, cur.t)
    is_last = nxt.alpha_bar >= 1.0
    ab_n = jnp.where(is_last, 0.5, nxt.alpha_bar)  # keep the unused branch finite
    lam_c, lam_n = _half_lambda(cur.alpha_bar), _half_lambda(ab_n)
    h = lam_n - lam_c  # [B]
    r = h_prev / h
    second = (1.0 + 0.5 / r)[:, None] * _flat(x0_hat) - (0.5 / r)[:, None] * _flat(x0_prev)
    d = jnp.where(has_prev, second.reshape(x.shape), x0_hat)
    sig_ratio = jnp.sqrt((1.0 - ab_n) / (1.0 - cur.alpha_bar))
    x_next = (
        process.expand_to(sig_ratio, x) * x
        - process.expand_to(jnp.sqrt(ab_n) * jnp.expm1(-h), x) * d
    )
    x_next = jnp.where(process.expand_to(is_last, x), x0_hat, x_next)
    return x_next, (x0_hat, h, jnp.ones_like(has_prev))


def _flat(x):
    return x.reshape(x.shape[0], -1)


def _sigma(alpha_bar):
    """VE noise level of the VP state: x / sqrt(abar) = x0 + sigma eps."""
    return jnp.sqrt((1.0 - alpha_bar) / alpha_bar)


def _karras_derivative(denoise, x, point):
    """(x_ve, d = (x_ve - x0_hat) / sigma) at a grid point, in VE coordinates."""
    x0_hat, _ = denoise(x, point.t)
    x_ve = x / process.expand_to(jnp.sqrt(point.alpha_bar), x)
    return x_ve, (x_ve - x0_hat) / process.expand_to(_sigma(point.alpha_bar), x)


def _to_vp(x_ve, alpha_bar):
    return x_ve * process.expand_to(jnp.sqrt(alpha_bar), x_ve)


@register_sampler("euler", grid="karras")
def euler_step(denoise, x, carry, cur, nxt, key):
    """Euler on the probability-flow ODE dx/dsigma = (x - D(x)) / sigma (Karras et al. 2022)."""
    del key
    x_ve, d = _karras_derivative(denoise, x, cur)
    dsigma = process.expand_to(_sigma(nxt.alpha_bar) - _sigma(cur.alpha_bar), x)
    return _to_vp(x_ve + dsigma * d, nxt.alpha_bar), carry


@register_sampler("heun", grid="karras")
def heun_step(denoise, x, carry, cur, nxt, key):
    """Heun's second-order method, Karras et al. (2022) Algorithm 1 (no churn): the
    correction is skipped on the last step, where sigma_next = 0."""
    del key
    x_ve, d = _karras_derivative(denoise, x, cur)
    sig_c, sig_n = _sigma(cur.alpha_bar), _sigma(nxt.alpha_bar)
    dsigma = process.expand_to(sig_n - sig_c, x)
    x_euler = x_ve + dsigma * d
    is_last = nxt.alpha_bar >= 1.0
    safe_n = GridPoint(nxt.t, jnp.where(is_last, cur.alpha_bar, nxt.alpha_bar))
    _, d2 = _karras_derivative(denoise, _to_vp(x_euler, safe_n.alpha_bar), safe_n)
    x_heun = x_ve + dsigma * 0.5 * (d + d2)
    x_ve_next = jnp.where(process.expand_to(is_last, x), x_euler, x_heun)
    return _to_vp(x_ve_next, nxt.alpha_bar), carry


# ---------------------------------------------------------------- grids and the loop


def discrete_grid(
    schedule: DiscreteSchedule, num_steps: int | None, spacing: str, skip_step0: bool = False
):
    """(times, alpha_bars) from noisiest to cleanest, then the final point t = 0.

    The network sees ``spaced_indices(T, num_steps, spacing)``. With ``skip_step0`` it sees
    the ``num_steps`` noisiest of ``spaced_indices(T, num_steps + 1, spacing)`` instead:
    step 0 (t = 1/T) is left out and the last step goes straight to t = 0, as in
    diffusers' ``timestep_spacing="linspace"`` with ``final_sigmas_type="zero"``. With
    num_steps = T there is no step to spare and every step is used.
    """
    T = schedule.num_steps
    n = T if num_steps is None else num_steps
    if skip_step0 and n < T:
        idx = spaced_indices(T, n + 1, spacing)[1:][::-1]
    else:
        idx = spaced_indices(T, n, spacing)[::-1]
    times = np.concatenate([np.asarray(schedule.times)[idx], [0.0]])
    abar = np.concatenate([np.asarray(schedule.alphas_cumprod, np.float64)[idx], [1.0]])
    return times, abar


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = KARRAS_RHO):
    """Karras et al. (2022) eq. 5: num_steps sigmas from sigma_max down to sigma_min, float64."""
    if num_steps < 1:
        raise ValueError(f"sample.num_steps must be >= 1, got {num_steps}.")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}.")
    ramp = np.linspace(0.0, 1.0, num_steps)
    inv_rho = 1.0 / rho
    return (sigma_max**inv_rho + ramp * (sigma_min**inv_rho - sigma_max**inv_rho)) ** rho


def karras_grid(schedule: DiscreteSchedule, num_steps: int | None, rho: float = KARRAS_RHO):
    """Karras et al. (2022) eq. 5 between the schedule's own sigma_max and sigma_min."""
    n = schedule.num_steps if num_steps is None else num_steps
    ab = np.asarray(schedule.alphas_cumprod, np.float64)
    log_snr = np.log(ab) - np.log1p(-ab)
    s_max, s_min = np.exp(-0.5 * log_snr[-1]), np.exp(-0.5 * log_snr[0])
    sigmas = karras_sigmas(n, s_min, s_max, rho)
    # Invert the continuous log-SNR view (decreasing in t) to get each sigma's time.
    times = np.interp(-2.0 * np.log(sigmas), log_snr[::-1], np.asarray(schedule.times)[::-1])
    abar = 1.0 / (1.0 + sigmas**2)
    return np.concatenate([times, [0.0]]), np.concatenate([abar, [1.0]])


def make_denoiser(model_fn, schedule: DiscreteSchedule, prediction: str, clip_x0: float | None):
    """denoise(x, t) -> (x0_hat, eps_hat), with x0 clipped (and eps made consistent)."""

    def denoise(x, t):
        ab = schedule.alpha_bar_at(t)
        out = model_fn(x, t).astype(jnp.float32)
        x0_hat, eps_hat = process.to_x0_and_eps(prediction, out, x, ab)
        if clip_x0 is not None:
            x0_hat = jnp.clip(x0_hat, -clip_x0, clip_x0)
            eps_hat = process.predict_eps_from_x0(x, x0_hat, ab)
        return x0_hat, eps_hat

    return denoise


def sample(
    model_fn,
    schedule: DiscreteSchedule,
    shape,
    key,
    *,
    sampler: str = DEFAULTS["sampler"],
    num_steps: int | None = None,
    spacing: str = DEFAULTS["spacing"],
    prediction: str = "eps",
    clip_x0: float | None = DEFAULTS["clip_x0"],
    num_trajectory: int = 0,
    x_T=None,
    **sampler_kwargs,
) -> SampleOutput:
    """Draws samples of ``shape`` by running ``sampler`` from pure noise to t = 0.

    ``num_steps`` (default: as many as the schedule has) network steps; on the discrete
    grid ``spacing`` picks which. ``clip_x0`` clips the predicted x_0 to
    [-clip_x0, clip_x0]; ``num_trajectory`` > 0 also returns the x_t fed to the network at
    that many evenly spaced steps (the first is x_T). Call inside ``jax.jit`` (with
    ``model_fn`` and the options static) to compile the loop once.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sample.sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}.")
    step_fn = SAMPLERS[sampler]
    grid = SAMPLER_GRIDS[sampler]
    if grid == "adaptive":
        if num_steps is not None or num_trajectory:
            raise ValueError(
                f"sample.sampler={sampler!r} chooses its own steps: leave sample.num_steps "
                "unset and sample.num_trajectory at 0 (set the solver's tolerances instead)."
            )
        denoise = make_denoiser(model_fn, schedule, prediction, clip_x0)
        init_key, loop_key = jax.random.split(key)
        x = jax.random.normal(init_key, shape, jnp.float32) if x_T is None else x_T
        x, nfe = step_fn(denoise, schedule, x, loop_key, **sampler_kwargs)
        return SampleOutput(x, None, None, nfe)
    if grid == "run":  # a whole run on its own grid of num_steps; no trajectory
        denoise = make_denoiser(model_fn, schedule, prediction, clip_x0)
        init_key, loop_key = jax.random.split(key)
        x = jax.random.normal(init_key, shape, jnp.float32) if x_T is None else x_T
        n = schedule.num_steps if num_steps is None else num_steps
        x, nfe = step_fn(denoise, schedule, x, loop_key, n, **sampler_kwargs)
        return SampleOutput(x, None, None, nfe)
    if grid == "karras":
        times, abar = karras_grid(schedule, num_steps)
    else:
        skip_step0 = grid == "discrete_skip_step0"
        times, abar = discrete_grid(schedule, num_steps, spacing, skip_step0)
    S = len(times) - 1
    batch = shape[0]
    denoise = make_denoiser(model_fn, schedule, prediction, clip_x0)

    init_key, loop_key = jax.random.split(key)
    x = jax.random.normal(init_key, shape, jnp.float32) if x_T is None else x_T
    # Trajectory slot of each loop position; n_traj means "not recorded" (dropped).
    n_traj = min(num_trajectory, S)
    record_at = np.round(np.linspace(0, S - 1, n_traj)).astype(np.int64) if n_traj else None
    slot_of_position = np.full((S,), n_traj, np.int32)
    if n_traj:
        slot_of_position[record_at] = np.arange(n_traj, dtype=np.int32)
    traj = jnp.zeros((n_traj,) + tuple(shape), jnp.float32)
    carry = (jnp.zeros(shape, jnp.float32), jnp.ones((batch,)), jnp.zeros((), bool))

    def point(i, arr_t, arr_ab):
        return GridPoint(jnp.full((batch,), arr_t[i]), jnp.full((batch,), arr_ab[i]))

    t_arr = jnp.asarray(times, jnp.float32)
    ab_arr = jnp.asarray(abar, jnp.float32)

    def body(state, i):
        x, carry, traj = state
        if n_traj:
            traj = traj.at[jnp.asarray(slot_of_position)[i]].set(x, mode="drop")
        cur, nxt = point(i, t_arr, ab_arr), point(i + 1, t_arr, ab_arr)
        x, carry = step_fn(
            denoise, x, carry, cur, nxt, jax.random.fold_in(loop_key, i), **sampler_kwargs
        )
        return (x, carry, traj), None

    (x, _, traj), _ = jax.lax.scan(body, (x, carry, traj), jnp.arange(S))
    if not n_traj:
        return SampleOutput(x, None, None)
    return SampleOutput(x, traj, times[record_at])
