"""Continuous-time diffusions: the VP, sub-VP and VE SDEs of Song et al. (2021), "Score-Based
Generative Modeling through Stochastic Differential Equations" (score_sde's ``sde_lib``).

Each SDE has a linear drift, dx = f(t) x dt + g(t) dW on t in [0, T], so its marginals are
Gaussian: x_t ~ N(scale(t) x_0, std(t)^2 I). ``marginal_coeffs(t) -> (scale, std)`` is the
closed form (Song et al. 2021, eqs. 29, 33 and 34), ``sde(x, t) -> (drift, diffusion)`` the
coefficients, ``reverse(score_fn)`` the reverse-time SDE (eq. 6) and ``probability_flow``
the ODE with the same marginals (eq. 13). ``score_fn(x, t) -> grad_x log p_t(x)`` with x
[B, ...] and t [B].

The lab's DDPM networks (``model_fn(x_t, t)`` with t in [0, 1], predicting eps, x0 or v)
serve as VP-SDE score models without retraining: ``VPSDE.from_schedule`` is the continuous
VP-SDE of the linear schedule (beta(t) = T (beta_start + t (beta_end - beta_start))), and
``score_fn_from_model`` turns the network into a score, calling it at the time at which the
schedule it was trained on has the same log-SNR.

Not for: networks, losses (``losses.py``, ``edm.py``) or samplers (``sde_samplers.py``).
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffax_lab.diffusion import process
from diffax_lab.diffusion.schedules import DiscreteSchedule

SDES = ("vp", "subvp", "ve")


def _flat_sum(x):
    return jnp.sum(x.reshape(x.shape[0], -1), axis=-1)


class ReverseSDE(NamedTuple):
    """dx = drift(x, t) dt + diffusion(t) dW-bar, run from t = T down to 0 (eq. 6)."""

    drift: Callable  # (x [B, ...], t [B]) -> [B, ...]
    diffusion: Callable  # t [B] -> [B]


class SDE(abc.ABC):
    """dx = f(t) x dt + g(t) dW on [0, T] with marginals N(scale(t) x_0, std(t)^2 I).

    The prior at t = T is N(0, prior_std^2 I). Subclasses give ``drift_coeff`` f(t),
    ``diffusion`` g(t), ``marginal_coeffs`` and ``prior_std``.
    """

    T: float = 1.0

    @abc.abstractmethod
    def drift_coeff(self, t):
        """f(t) [B] in the drift f(t) x."""

    @abc.abstractmethod
    def diffusion(self, t):
        """g(t) [B]."""

    @abc.abstractmethod
    def marginal_coeffs(self, t):
        """(scale(t), std(t)), each [B]: x_t = scale x_0 + std eps."""

    @property
    @abc.abstractmethod
    def prior_std(self) -> float:
        """Standard deviation of the prior N(0, prior_std^2 I) at t = T."""

    def sde(self, x, t):
        """(drift [B, ...], diffusion [B]) of the forward SDE."""
        return process.expand_to(self.drift_coeff(t), x) * x, self.diffusion(t)

    def marginal(self, x0, t):
        """(mean [B, ...], std [B]) of p_t(x_t | x_0)."""
        scale, std = self.marginal_coeffs(t)
        return process.expand_to(scale, x0) * x0, std

    def transition(self, t_from, t_to):
        """(ratio, var) of the forward kernel x_to = ratio x_from + sqrt(var) z, t_from < t_to.

        For a linear SDE both follow from the marginals: ratio = scale(t_to) / scale(t_from),
        var = std(t_to)^2 - ratio^2 std(t_from)^2 (the integral of (scale(t_to)/scale(u))^2
        g(u)^2 over [t_from, t_to]).
        """
        s_from, sd_from = self.marginal_coeffs(t_from)
        s_to, sd_to = self.marginal_coeffs(t_to)
        ratio = s_to / s_from
        return ratio, jnp.square(sd_to) - jnp.square(ratio * sd_from)

    def prior_sample(self, key, shape):
        return self.prior_std * jax.random.normal(key, shape, jnp.float32)

    def prior_logp(self, z):
        """log N(z; 0, prior_std^2 I), summed over all but the batch axis [B]."""
        dim = math.prod(z.shape[1:])
        var = self.prior_std**2
        return -0.5 * dim * math.log(2 * math.pi * var) - 0.5 * _flat_sum(jnp.square(z)) / var

    def reverse(self, score_fn, probability_flow: bool = False) -> ReverseSDE:
        """The reverse-time SDE f x - g^2 score (eq. 6), or with probability_flow the ODE
        f x - g^2 score / 2 with zero diffusion (eq. 13)."""
        weight = 0.5 if probability_flow else 1.0

        def drift(x, t):
            f, g = self.sde(x, t)
            return f - process.expand_to(weight * jnp.square(g), x) * score_fn(x, t)

        def diffusion(t):
            g = self.diffusion(t)
            return jnp.zeros_like(g) if probability_flow else g

        return ReverseSDE(drift, diffusion)

    def probability_flow(self, score_fn):
        """dx/dt = f(t) x - g(t)^2 score(x, t) / 2 (Song et al. 2021, eq. 13)."""
        return self.reverse(score_fn, probability_flow=True).drift

    def score_from_x0(self, x, x0_hat, t):
        """Tweedie: score = (scale x0_hat - x) / std^2 for the Gaussian kernel at t."""
        scale, std = self.marginal_coeffs(t)
        return (process.expand_to(scale, x) * x0_hat - x) / process.expand_to(jnp.square(std), x)

    def x0_from_score(self, x, score, t):
        """Tweedie's posterior mean E[x_0 | x_t] = (x + std^2 score) / scale."""
        scale, std = self.marginal_coeffs(t)
        return (x + process.expand_to(jnp.square(std), x) * score) / process.expand_to(scale, x)


def _check_positive(name, value):
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"diffusion.{name} must be a positive number, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class VPSDE(SDE):
    """Variance preserving: dx = -beta(t) x / 2 dt + sqrt(beta(t)) dW, beta linear in t
    (eq. 32, the continuous DDPM). scale = exp(-int beta / 2), std^2 = 1 - scale^2 (eq. 33)."""

    beta_min: float = 0.1
    beta_max: float = 20.0
    T: float = 1.0

    def __post_init__(self):
        _check_positive("beta_min", self.beta_min)
        _check_positive("beta_max", self.beta_max)
        if self.beta_max < self.beta_min:
            raise ValueError(
                f"diffusion.beta_max ({self.beta_max}) must be >= beta_min ({self.beta_min})."
            )

    @classmethod
    def from_schedule(cls, schedule: DiscreteSchedule) -> VPSDE:
        """The VP-SDE whose beta(t) is T times the linear schedule's betas (score_sde's
        N-step discretisation): beta_min = T beta_1, beta_max = T beta_T."""
        betas = np.asarray(schedule.betas, np.float64)
        n = betas.shape[0]
        if n < 2 or not np.allclose(np.diff(betas), (betas[-1] - betas[0]) / (n - 1), rtol=1e-3):
            raise ValueError(
                "VPSDE.from_schedule needs the (unrespaced) linear schedule "
                "(diffusion.schedule='linear'); for cosine or sigmoid schedules sample with "
                "samplers.sample(sampler='pc' | 'euler_maruyama' | 'ode'), which use the "
                "schedule's own alpha_bar."
            )
        return cls(beta_min=float(n * betas[0]), beta_max=float(n * betas[-1]))

    def beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_mean_coeff(self, t):
        """log scale(t) = -int_0^t beta / 2 = -(beta_min t + (beta_max - beta_min) t^2 / 2) / 2."""
        return -0.25 * jnp.square(t) * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def alpha_bar(self, t):
        return jnp.exp(2.0 * self.log_mean_coeff(t))

    def log_snr(self, t):
        """log(alpha_bar / (1 - alpha_bar))."""
        lmc2 = 2.0 * self.log_mean_coeff(t)
        return lmc2 - jnp.log(-jnp.expm1(lmc2))

    def drift_coeff(self, t):
        return -0.5 * self.beta(t)

    def diffusion(self, t):
        return jnp.sqrt(self.beta(t))

    def marginal_coeffs(self, t):
        lmc = self.log_mean_coeff(t)
        return jnp.exp(lmc), jnp.sqrt(-jnp.expm1(2.0 * lmc))

    @property
    def prior_std(self) -> float:
        return 1.0


@dataclasses.dataclass(frozen=True)
class SubVPSDE(VPSDE):
    """Sub-VP (eq. 34): the VP drift with g(t)^2 = beta(t) (1 - exp(-2 int_0^t beta)); the
    same mean, std = 1 - scale^2, always below the VP std (Song et al. 2021, Theorem 2)."""

    def diffusion(self, t):
        integral = self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * jnp.square(t)
        return jnp.sqrt(self.beta(t) * -jnp.expm1(-2.0 * integral))

    def marginal_coeffs(self, t):
        lmc = self.log_mean_coeff(t)
        return jnp.exp(lmc), -jnp.expm1(2.0 * lmc)

    def log_snr(self, t):
        scale, std = self.marginal_coeffs(t)
        return 2.0 * (jnp.log(scale) - jnp.log(std))


@dataclasses.dataclass(frozen=True)
class VESDE(SDE):
    """Variance exploding (eq. 30, continuous NCSN/SMLD): dx = sqrt(d sigma^2 / dt) dW with
    sigma(t) = sigma_min (sigma_max / sigma_min)^t. As in score_sde the marginal std is
    sigma(t), i.e. the data at t = 0 already carries sigma_min of noise; the prior is
    N(0, sigma_max^2 I)."""

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    T: float = 1.0

    def __post_init__(self):
        _check_positive("sigma_min", self.sigma_min)
        _check_positive("sigma_max", self.sigma_max)
        if self.sigma_max <= self.sigma_min:
            raise ValueError(
                f"diffusion.sigma_max ({self.sigma_max}) must exceed sigma_min ({self.sigma_min})."
            )

    def sigma(self, t):
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def time_at_sigma(self, sigma):
        """Inverse of ``sigma``: t = log(sigma / sigma_min) / log(sigma_max / sigma_min)."""
        return jnp.log(sigma / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)

    def discrete_sigmas(self, num_scales: int) -> np.ndarray:
        """NCSN's geometric noise levels, increasing from sigma_min to sigma_max [N]."""
        if num_scales < 2:
            raise ValueError(f"diffusion.num_scales must be >= 2, got {num_scales}.")
        return np.exp(np.linspace(np.log(self.sigma_min), np.log(self.sigma_max), num_scales))

    def drift_coeff(self, t):
        return jnp.zeros_like(jnp.asarray(t, jnp.float32))

    def diffusion(self, t):
        # d sigma(t)^2 / dt = 2 sigma(t)^2 log(sigma_max / sigma_min).
        return self.sigma(t) * math.sqrt(2.0 * math.log(self.sigma_max / self.sigma_min))

    def marginal_coeffs(self, t):
        sigma = self.sigma(t)
        return jnp.ones_like(sigma), sigma

    def log_snr(self, t):
        return -2.0 * jnp.log(self.sigma(t))

    @property
    def prior_std(self) -> float:
        return self.sigma_max


def get_sde(name: str, **kwargs) -> SDE:
    """The SDE called ``name`` (``vp``, ``subvp``, ``ve``) with its own keyword defaults."""
    classes = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}
    if name not in classes:
        raise ValueError(f"diffusion.sde must be one of {SDES}, got {name!r}.")
    return classes[name](**kwargs)


# ---------------------------------------------------------------- networks as scores


def score_fn_from_model(
    model_fn, sde: SDE, prediction: str = "eps", schedule: DiscreteSchedule | None = None
):
    """score_fn(x, t) from a network ``model_fn(x_t, t) -> eps | x0 | v`` of ``sde``'s x_t.

    With ``schedule`` (the DDPM schedule the network was trained on) the network is called
    at the time where that schedule has the SDE's log-SNR at t, so it sees the noise level
    it was trained at; without it, at t itself. eps: score = -eps / std; x0: Tweedie's
    (scale x0 - x) / std^2; v needs a VP SDE (scale^2 + std^2 = 1).

    Below the schedule's first noise level (t < ~1e-3 for the linear VP-SDE of T = 1000) the
    network's time is extrapolated below 1 / T, where it was never trained: start samplers
    and likelihoods of DDPM networks at eps >= 1e-3.
    """
    if prediction not in process.PREDICTIONS:
        raise ValueError(
            f"diffusion.prediction must be one of {process.PREDICTIONS}, got {prediction!r}."
        )
    if prediction == "v" and (not isinstance(sde, VPSDE) or isinstance(sde, SubVPSDE)):
        raise ValueError("v prediction needs the VP SDE (diffusion.sde='vp').")

    def score_fn(x, t):
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
        t_net = t if schedule is None else schedule.time_at_log_snr(sde.log_snr(t))
        out = model_fn(x, t_net).astype(jnp.float32)
        scale, std = sde.marginal_coeffs(t)
        if prediction == "eps":
            return -out / process.expand_to(std, x)
        if prediction == "x0":
            return sde.score_from_x0(x, out, t)
        _, eps = process.to_x0_and_eps("v", out, x, jnp.square(scale))
        return -eps / process.expand_to(std, x)

    return score_fn


def score_fn_from_sigma_model(model_fn, sde: VESDE, scale_by_sigma: bool = True):
    """score_fn(x, t) from a sigma-conditioned network ``model_fn(x, sigma) -> output``
    (NCSN++, Song et al. 2021): score = output / sigma when ``scale_by_sigma`` (their
    ``model.scale_by_sigma``), else the output itself."""

    def score_fn(x, t):
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
        sigma = sde.sigma(t)
        out = model_fn(x, sigma).astype(jnp.float32)
        return out / process.expand_to(sigma, x) if scale_by_sigma else out

    return score_fn
