"""Noise schedules: the continuous-time view and the discrete DDPM arrays built from it.

Conventions (used throughout diffax_lab):
- Discrete steps are indexed ``i = 0 .. T-1``; index ``i`` is the paper's ``t = i + 1``.
- Continuous time ``t`` lies in [0, 1]; discrete step ``i`` sits at ``t_i = (i + 1) / T``.
  Networks see this continuous time, so a model trained with T = 1000 can be sampled on
  any subset of steps, and a schedule with T = 100 feeds the same time range.
- ``alpha_bar`` is the paper's \\bar{alpha}_t = prod_{s<=t} (1 - beta_s) (``alphas_cumprod``);
  ``snr = alpha_bar / (1 - alpha_bar)`` and ``log_snr = log(snr)``.

Not for: networks, losses or samplers (see ``process.py``, ``losses.py``, ``samplers.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
from flax import struct

SCHEDULES = ("linear", "cosine", "sigmoid")

# Linear schedule of Ho et al. (2020), section 4: beta from 1e-4 to 0.02 over T = 1000.
LINEAR_BETA_START = 1e-4
LINEAR_BETA_END = 0.02
# Cosine schedule of Nichol & Dhariwal (2021), eq. 17: offset s and the clip on beta.
COSINE_S = 0.008
MAX_BETA = 0.999
# Sigmoid schedule of Jabri et al. (2023) / Chen (2023): sigmoid((t (end - start) + start) / tau).
SIGMOID_START, SIGMOID_END, SIGMOID_TAU = -3.0, 3.0, 1.0


def continuous_alpha_bar(
    name: str, num_timesteps: int = 1000
) -> Callable[[np.ndarray], np.ndarray]:
    """Returns alpha_bar(t) for t in [0, 1] in float64 numpy (exact, not interpolated).

    For ``linear`` this is the continuous-time limit of DDPM's schedule (the VP-SDE of
    Song et al. 2021 with beta(t) = 1000 (beta_start + t (beta_end - beta_start)), i.e.
    beta_min = 0.1, beta_max = 20): alpha_bar(t) = exp(-(beta_min t + (beta_max - beta_min)
    t^2 / 2)). It is the same for every T, because ``discrete_betas`` scales the betas by
    1000 / T; the discrete schedule differs from it by O(beta^2) and O(1/T).
    """
    if name == "linear":
        del num_timesteps  # the limit does not depend on T (see above)
        b0, b1 = LINEAR_BETA_START * 1000.0, LINEAR_BETA_END * 1000.0

        def alpha_bar(t):
            t = np.asarray(t, np.float64)
            return np.exp(-(b0 * t + 0.5 * (b1 - b0) * t**2))

    elif name == "cosine":
        # Nichol & Dhariwal (2021) eq. 17: f(t) = cos^2(((t + s) / (1 + s)) * pi / 2).
        def f(t):
            return (
                np.cos((np.asarray(t, np.float64) + COSINE_S) / (1 + COSINE_S) * math.pi / 2) ** 2
            )

        def alpha_bar(t):
            return f(t) / f(0.0)

    elif name == "sigmoid":

        def sig(z):
            return 1.0 / (1.0 + np.exp(-z))

        v_start = sig(SIGMOID_START / SIGMOID_TAU)
        v_end = sig(SIGMOID_END / SIGMOID_TAU)

        def alpha_bar(t):
            t = np.asarray(t, np.float64)
            out = v_end - sig((t * (SIGMOID_END - SIGMOID_START) + SIGMOID_START) / SIGMOID_TAU)
            return out / (v_end - v_start)

    else:
        raise ValueError(f"Unknown noise schedule {name!r}; choose one of {SCHEDULES}.")
    return alpha_bar


def discrete_betas(name: str, num_timesteps: int) -> np.ndarray:
    """The T betas of a named schedule, float64, before any respacing."""
    if num_timesteps < 1:
        raise ValueError(f"diffusion.num_timesteps must be >= 1, got {num_timesteps}.")
    if name == "linear":
        # Ho et al. (2020): the endpoints are given for T = 1000; scaled by 1000 / T so that
        # other T (the course's T = 100, say) keep the same total amount of noise.
        scale = 1000.0 / num_timesteps
        if scale * LINEAR_BETA_END > MAX_BETA:
            # Below T = 21 the last beta would reach 1 or more: alpha_t <= 0, no schedule.
            raise ValueError(
                f"diffusion.num_timesteps={num_timesteps} is too few for the linear schedule "
                f"(its last beta would be {scale * LINEAR_BETA_END:.3g} >= 1); use at least "
                f"{int(np.floor(1000.0 * LINEAR_BETA_END / MAX_BETA)) + 1} steps or "
                "diffusion.schedule='cosine'."
            )
        return np.linspace(
            scale * LINEAR_BETA_START, scale * LINEAR_BETA_END, num_timesteps, dtype=np.float64
        )
    alpha_bar = continuous_alpha_bar(name, num_timesteps)
    t = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    ab = alpha_bar(t)
    # Nichol & Dhariwal (2021) eq. 17 discretised: beta_t = 1 - abar(t) / abar(t - 1/T),
    # clipped at 0.999 to avoid the singularity at t = 1.
    return np.minimum(1.0 - ab[1:] / ab[:-1], MAX_BETA)


@struct.dataclass
class DiscreteSchedule:
    """The DDPM arrays for a chosen set of steps, as a pytree that jit can take.

    ``times[i]`` is the continuous time of step i (what the network is told), and
    ``alphas_cumprod[i]`` its alpha_bar. After ``respace`` these are a subset of the
    original steps and ``betas`` are recomputed so that alpha_bar is unchanged
    (Nichol & Dhariwal 2021, section 4).
    """

    betas: jnp.ndarray  # [S]
    alphas_cumprod: jnp.ndarray  # [S]
    times: jnp.ndarray  # [S], continuous time in (0, 1]

    @property
    def num_steps(self) -> int:
        return self.betas.shape[0]

    @property
    def alphas(self):
        return 1.0 - self.betas

    @property
    def alphas_cumprod_prev(self):
        return jnp.concatenate(
            [jnp.ones((1,), self.alphas_cumprod.dtype), self.alphas_cumprod[:-1]]
        )

    @property
    def snr(self):
        return self.alphas_cumprod / (1.0 - self.alphas_cumprod)

    @property
    def log_snr(self):
        return jnp.log(self.alphas_cumprod) - jnp.log1p(-self.alphas_cumprod)

    @property
    def posterior_variance(self):
        """beta_tilde_t = beta_t (1 - abar_{t-1}) / (1 - abar_t), DDPM eq. 7."""
        return self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    @property
    def posterior_log_variance_clipped(self):
        """log beta_tilde with the t = 1 entry (zero) replaced by the t = 2 one, as in DDPM's code."""
        var = self.posterior_variance
        if var.shape[0] > 1:
            var = jnp.concatenate([var[1:2], var[1:]])
        else:  # A single step has no beta_tilde > 0 to borrow; use beta.
            var = self.betas
        return jnp.log(var)

    @property
    def posterior_mean_coef1(self):
        """Coefficient of x_0 in the posterior mean (DDPM eq. 7)."""
        return self.betas * jnp.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    @property
    def posterior_mean_coef2(self):
        """Coefficient of x_t in the posterior mean (DDPM eq. 7)."""
        return (
            (1.0 - self.alphas_cumprod_prev) * jnp.sqrt(self.alphas) / (1.0 - self.alphas_cumprod)
        )

    def log_snr_at(self, t):
        """Continuous view: log-SNR at any t in [0, 1], exact at the grid, linear in between.

        Beyond the first grid point (t < times[0]) it extrapolates linearly, so the
        function is defined on all of [0, 1] and stays strictly decreasing.
        """
        t = jnp.asarray(t, jnp.float32)
        ts, ls = self.times, self.log_snr
        inside = jnp.interp(t, ts, ls)
        if ts.shape[0] > 1:
            slope = (ls[1] - ls[0]) / (ts[1] - ts[0])
            inside = jnp.where(t < ts[0], ls[0] + slope * (t - ts[0]), inside)
        return inside

    def time_at_log_snr(self, log_snr):
        """Inverse of ``log_snr_at``: the continuous time with this log-SNR, exact at the
        grid, linear in between, extrapolated linearly above the first grid point's log-SNR
        and clamped to the last grid time below the last one's."""
        ls = jnp.asarray(log_snr, jnp.float32)
        ts, grid = self.times, self.log_snr
        inside = jnp.interp(-ls, -grid, ts)  # -log_snr increases with t
        if ts.shape[0] > 1:
            slope = (grid[1] - grid[0]) / (ts[1] - ts[0])
            inside = jnp.where(ls > grid[0], ts[0] + (ls - grid[0]) / slope, inside)
        return inside

    def alpha_bar_at(self, t):
        """alpha_bar at continuous time t: sigmoid(log_snr(t))."""
        return 1.0 / (1.0 + jnp.exp(-self.log_snr_at(t)))

    def respace(self, indices) -> DiscreteSchedule:
        """The schedule restricted to the increasing step indices given (0-based)."""
        idx = np.asarray(indices)
        if idx.ndim != 1 or idx.size == 0 or np.any(np.diff(idx) <= 0):
            raise ValueError(f"respace needs strictly increasing step indices, got {indices!r}.")
        if idx[0] < 0 or idx[-1] >= self.num_steps:
            raise ValueError(f"respace indices must lie in [0, {self.num_steps}), got {indices!r}.")
        ab = np.asarray(self.alphas_cumprod, np.float64)[idx]
        ab_prev = np.concatenate([[1.0], ab[:-1]])
        betas = 1.0 - ab / ab_prev
        return DiscreteSchedule(
            betas=jnp.asarray(betas, jnp.float32),
            alphas_cumprod=jnp.asarray(ab, jnp.float32),
            times=jnp.asarray(np.asarray(self.times)[idx], jnp.float32),
        )


def get_schedule(name: str, num_timesteps: int) -> DiscreteSchedule:
    """Builds the named schedule with T = num_timesteps steps (alpha_bar in float64 first)."""
    if name not in SCHEDULES:
        raise ValueError(f"diffusion.schedule must be one of {SCHEDULES}, got {name!r}.")
    betas = discrete_betas(name, num_timesteps)
    alphas_cumprod = np.cumprod(1.0 - betas)
    times = np.arange(1, num_timesteps + 1, dtype=np.float64) / num_timesteps
    return DiscreteSchedule(
        betas=jnp.asarray(betas, jnp.float32),
        alphas_cumprod=jnp.asarray(alphas_cumprod, jnp.float32),
        times=jnp.asarray(times, jnp.float32),
    )


def spaced_indices(num_timesteps: int, num_steps: int, spacing: str = "uniform") -> np.ndarray:
    """Which of the T steps a sampler with ``num_steps`` steps visits (increasing, 0-based).

    ``uniform`` spreads them evenly and always includes the last step (i = T - 1) and the
    first (i = 0); ``quadratic`` (DDIM, Song et al. 2021) puts more of them near t = 0.
    """
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(
            f"sample.num_steps must be in [1, {num_timesteps}] (diffusion.num_timesteps), "
            f"got {num_steps}."
        )
    if spacing == "uniform":
        idx = np.round(np.linspace(0, num_timesteps - 1, num_steps)).astype(np.int64)
    elif spacing == "quadratic":
        idx = np.round(np.linspace(0, math.sqrt(num_timesteps - 1), num_steps) ** 2).astype(
            np.int64
        )
    else:
        raise ValueError(f"sample.spacing must be 'uniform' or 'quadratic', got {spacing!r}.")
    idx = np.unique(idx)
    if idx.size != num_steps:  # Rounding merged steps (quadratic near 0): fill from the rest.
        missing = np.setdiff1d(np.arange(num_timesteps), idx)[: num_steps - idx.size]
        idx = np.sort(np.concatenate([idx, missing]))
    return idx
