"""Samplers of the continuous-time SDEs (Song et al. 2021): reverse-SDE Euler-Maruyama,
predictor-corrector, and the probability-flow ODE with adaptive solvers from diffrax.

Two entry points, one set of update rules:

- ``sde_sample(score_fn, sde, shape, key, ...)`` and ``ode_sample(...)`` sample any SDE of
  ``sde.py`` given ``score_fn(x, t)`` (VE networks, exact scores, a DDPM network made a
  score by ``sde.score_fn_from_model``), on the uniform time grid T -> eps of score_sde.
- The lab's DDPM networks also sample through ``samplers.sample`` with
  ``sampler="euler_maruyama" | "pc" | "ode"``: the first two are steps of its compiled
  scan on the schedule's own grid (the VP-SDE whose alpha_bar is the schedule's at every
  grid point, beta integrated exactly over each step); ``ode`` is registered as a whole run
  (``grid="adaptive"``) because an adaptive solver picks its own steps and cannot be one
  step of a fixed scan. It integrates the VP probability-flow ODE of any schedule in the
  half log-SNR clock (see ``ode_run``).

Predictors and correctors are registered by name. A predictor moves x from the noise level
``cur`` to the less noisy ``nxt`` (a ``Step``: each level's x_t = scale x_0 + std eps, and
the forward SDE's f dt and g^2 dt over the step); a corrector runs Langevin MCMC at ``cur``.

Not for: the SDEs themselves (``sde.py``), the EDM sampler (``edm.py``), likelihoods
(``metrics/ode_likelihood.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from diffax_lab.diffusion import process
from diffax_lab.diffusion.samplers import SampleOutput, register_sampler
from diffax_lab.diffusion.schedules import DiscreteSchedule
from diffax_lab.diffusion.sde import SDE

PREDICTORS: dict[str, Callable] = {}
CORRECTORS: dict[str, Callable] = {}
# Explicit Runge-Kutta pairs with an embedded error estimate. Both are FSAL with 7 stages:
# each attempted step (accepted or rejected) costs 6 new evaluations, plus one at the start.
SOLVERS = {"tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5}
EVALS_PER_STEP = {"tsit5": 6, "dopri5": 6}
MAX_STEPS = 16_384


class Step(NamedTuple):
    """One step from the noise level ``cur`` down to ``nxt``, each [B]."""

    scale_cur: jnp.ndarray
    std_cur: jnp.ndarray
    scale_nxt: jnp.ndarray
    std_nxt: jnp.ndarray
    f_dt: jnp.ndarray  # drift coefficient f times the step length (Euler-Maruyama)
    g2_dt: jnp.ndarray  # g^2 times the step length


def step_of_sde(sde: SDE, t_cur, t_nxt) -> Step:
    """The step t_cur -> t_nxt < t_cur of ``sde``, with f and g taken at t_cur (Euler)."""
    scale_c, std_c = sde.marginal_coeffs(t_cur)
    scale_n, std_n = sde.marginal_coeffs(t_nxt)
    dt = t_cur - t_nxt
    return Step(
        scale_c,
        std_c,
        scale_n,
        std_n,
        sde.drift_coeff(t_cur) * dt,
        jnp.square(sde.diffusion(t_cur)) * dt,
    )


def step_of_alpha_bars(ab_cur, ab_nxt) -> Step:
    """A VP step between two alpha_bars: int beta dt = log(ab_nxt / ab_cur) over the step."""
    int_beta = jnp.log(ab_nxt) - jnp.log(ab_cur)
    return Step(
        jnp.sqrt(ab_cur),
        jnp.sqrt(1.0 - ab_cur),
        jnp.sqrt(ab_nxt),
        jnp.sqrt(1.0 - ab_nxt),
        -0.5 * int_beta,
        int_beta,
    )


def _e(a, x):
    return process.expand_to(a, x)


def register_predictor(name: str):
    def wrap(fn):
        if name in PREDICTORS:
            raise ValueError(f"Predictor {name!r} is registered twice.")
        PREDICTORS[name] = fn
        return fn

    return wrap


def register_corrector(name: str):
    def wrap(fn):
        if name in CORRECTORS:
            raise ValueError(f"Corrector {name!r} is registered twice.")
        CORRECTORS[name] = fn
        return fn

    return wrap


# ---------------------------------------------------------------- predictors
# predictor(x, score, step, key) -> (x_next, x_next_mean); score is at (x, cur).


@register_predictor("euler_maruyama")
def euler_maruyama_update(x, score, step: Step, key):
    """Euler-Maruyama on the reverse SDE dx = (f x - g^2 score) dt + g dW (eq. 6), dt < 0."""
    x_mean = x - _e(step.f_dt, x) * x + _e(step.g2_dt, x) * score
    noise = jax.random.normal(key, x.shape, x.dtype)
    return x_mean + _e(jnp.sqrt(step.g2_dt), x) * noise, x_mean


@register_predictor("reverse_diffusion")
def reverse_diffusion_update(x, score, step: Step, key):
    """Song et al. (2021) eq. 46: reverse the forward kernel x_cur = r x_nxt + G z of the
    step, x_nxt = (2 - r) x + G^2 score + G z. For VP, r = sqrt(1 - beta_i) and G^2 = beta_i
    (score_sde's discretisation); for VE, r = 1 and G^2 = sigma_cur^2 - sigma_nxt^2."""
    r = step.scale_cur / step.scale_nxt
    g2 = jnp.maximum(jnp.square(step.std_cur) - jnp.square(r * step.std_nxt), 0.0)
    x_mean = _e(2.0 - r, x) * x + _e(g2, x) * score
    noise = jax.random.normal(key, x.shape, x.dtype)
    return x_mean + _e(jnp.sqrt(g2), x) * noise, x_mean


@register_predictor("ancestral")
def ancestral_update(x, score, step: Step, key):
    """Ancestral sampling (Song et al. 2021, eq. 47; DDPM with beta_tilde): draw from the
    posterior q(x_nxt | x_cur, x0_hat) with Tweedie's x0_hat = (x + std_cur^2 score) / scale_cur.
    For VE this is score_sde's ancestral predictor; their VP one uses beta for the variance."""
    r = step.scale_cur / step.scale_nxt
    var_c, var_n = jnp.square(step.std_cur), jnp.square(step.std_nxt)
    g2 = jnp.maximum(var_c - jnp.square(r) * var_n, 0.0)
    x0_hat = (x + _e(var_c, x) * score) / _e(step.scale_cur, x)
    # Posterior of x_nxt ~ N(scale_n x0, var_n) given x_cur ~ N(r x_nxt, G^2) (DDPM eq. 7).
    x_mean = (_e(g2 * step.scale_nxt, x) * x0_hat + _e(r * var_n, x) * x) / _e(var_c, x)
    std = jnp.sqrt(var_n * g2 / var_c)
    noise = jax.random.normal(key, x.shape, x.dtype)
    return x_mean + _e(std, x) * noise, x_mean


@register_predictor("none")
def no_predictor(x, score, step: Step, key):
    del score, step, key
    return x, x


# ---------------------------------------------------------------- correctors
# corrector(score_at, x, step, key, *, snr, num_steps) -> (x, x_mean); score_at(x) at cur.


@register_corrector("langevin")
def langevin_update(score_at, x, step: Step, key, *, snr: float, num_steps: int):
    """Langevin MCMC at the current level (Song et al. 2021, Algorithm 4 and 5): step size
    2 alpha (snr ||z|| / ||score||)^2 with the norms averaged over the batch as in score_sde,
    alpha = (scale_cur / scale_nxt)^2 (1 - beta_i for VP, 1 for VE)."""
    alpha = jnp.square(step.scale_cur / step.scale_nxt)

    def norm(a):
        return jnp.mean(jnp.sqrt(jnp.sum(jnp.square(a.reshape(a.shape[0], -1)), axis=-1)))

    def body(i, state):
        x, _ = state
        grad = score_at(x)
        noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        step_size = 2.0 * alpha * jnp.square(snr * norm(noise) / norm(grad))  # [B]
        x_mean = x + _e(step_size, x) * grad
        return x_mean + _e(jnp.sqrt(2.0 * step_size), x) * noise, x_mean

    return jax.lax.fori_loop(0, num_steps, body, (x, x))


@register_corrector("none")
def no_corrector(score_at, x, step: Step, key, *, snr: float, num_steps: int):
    del score_at, step, key, snr, num_steps
    return x, x


def _check(predictor, corrector, corrector_steps):
    if predictor not in PREDICTORS:
        raise ValueError(
            f"sample.predictor must be one of {sorted(PREDICTORS)}, got {predictor!r}."
        )
    if corrector not in CORRECTORS:
        raise ValueError(
            f"sample.corrector must be one of {sorted(CORRECTORS)}, got {corrector!r}."
        )
    if corrector_steps < 0:
        raise ValueError(f"sample.corrector_steps must be >= 0, got {corrector_steps}.")
    if predictor == "none" and corrector == "none":
        raise ValueError("sample.predictor and sample.corrector cannot both be 'none'.")


def _pc_update(score_at, x, step, key, is_last, predictor, corrector, snr, corrector_steps):
    """Corrector at cur, then predictor to nxt (score_sde's order); no noise on the last step."""
    k_corr, k_pred = jax.random.split(key)
    if corrector != "none" and corrector_steps:
        x, _ = CORRECTORS[corrector](score_at, x, step, k_corr, snr=snr, num_steps=corrector_steps)
    score = score_at(x) if predictor != "none" else None
    x_new, x_mean = PREDICTORS[predictor](x, score, step, k_pred)
    return jnp.where(is_last, x_mean, x_new)


def _evals_per_step(predictor, corrector, corrector_steps):
    return int(predictor != "none") + (corrector_steps if corrector != "none" else 0)


# ---------------------------------------------------------------- any SDE, given its score


def sde_sample(
    score_fn,
    sde: SDE,
    shape,
    key,
    *,
    predictor: str = "reverse_diffusion",
    corrector: str = "langevin",
    num_steps: int = 1000,
    snr: float = 0.16,
    corrector_steps: int = 1,
    eps: float = 1e-3,
    denoise: bool = True,
    x_T=None,
) -> SampleOutput:
    """Predictor-corrector sampling (Song et al. 2021, Algorithm 1) in one ``lax.scan``.

    ``num_steps`` steps on the uniform grid from T to ``eps``; predictor ``euler_maruyama``
    with corrector ``none`` is the plain Euler-Maruyama sampler of the reverse SDE. With
    ``denoise`` the result is Tweedie's E[x_0 | x_eps] (one more evaluation). ``nfe`` is
    num_steps (predictor + corrector_steps evaluations) (+ 1). Call inside ``jax.jit``.
    """
    _check(predictor, corrector, corrector_steps)
    if num_steps < 1:
        raise ValueError(f"sample.num_steps must be >= 1, got {num_steps}.")
    if not 0.0 < eps < sde.T:
        raise ValueError(f"sample.eps must lie in (0, {sde.T}), got {eps}.")
    batch = shape[0]
    init_key, loop_key = jax.random.split(key)
    x = sde.prior_sample(init_key, shape) if x_T is None else x_T
    times = jnp.asarray(np.linspace(sde.T, eps, num_steps + 1), jnp.float32)

    def body(x, i):
        t_cur = jnp.full((batch,), times[i])
        t_nxt = jnp.full((batch,), times[i + 1])
        step = step_of_sde(sde, t_cur, t_nxt)
        x = _pc_update(
            lambda y: score_fn(y, t_cur),
            x,
            step,
            jax.random.fold_in(loop_key, i),
            i == num_steps - 1,
            predictor,
            corrector,
            snr,
            corrector_steps,
        )
        return x, None

    x, _ = jax.lax.scan(body, x, jnp.arange(num_steps))
    nfe = num_steps * _evals_per_step(predictor, corrector, corrector_steps)
    if denoise:
        t_eps = jnp.full((batch,), eps, jnp.float32)
        x = sde.x0_from_score(x, score_fn(x, t_eps), t_eps)
        nfe += 1
    return SampleOutput(x, None, None, nfe)


def solve_ode(
    vector_field,
    y0,
    t0: float,
    t1: float,
    *,
    solver: str = "tsit5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = MAX_STEPS,
):
    """y(t1) of dy/dt = vector_field(y, t) (any pytree y) by diffrax with a PID step-size
    controller, and the number of vector-field evaluations it took (a traced int)."""
    if solver not in SOLVERS:
        raise ValueError(f"sample.solver must be one of {sorted(SOLVERS)}, got {solver!r}.")
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"sample.rtol and sample.atol must be > 0, got {rtol}, {atol}.")
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, args: vector_field(y, t)),
        SOLVERS[solver](),
        t0=t0,
        t1=t1,
        dt0=None,
        y0=y0,
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        saveat=diffrax.SaveAt(t1=True),
        max_steps=max_steps,
    )
    y1 = jax.tree.map(lambda a: a[-1], sol.ys)
    return y1, EVALS_PER_STEP[solver] * sol.stats["num_steps"] + 1


def ode_sample(
    score_fn,
    sde: SDE,
    shape,
    key,
    *,
    solver: str = "tsit5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    eps: float = 1e-3,
    denoise: bool = True,
    x_T=None,
    max_steps: int = MAX_STEPS,
) -> SampleOutput:
    """Integrates the probability-flow ODE (eq. 13) from T to ``eps`` with an adaptive
    diffrax solver (``tsit5`` or ``dopri5``); ``nfe`` counts every score evaluation,
    rejected steps included. Call inside ``jax.jit``."""
    if not 0.0 < eps < sde.T:
        raise ValueError(f"sample.eps must lie in (0, {sde.T}), got {eps}.")
    batch = shape[0]
    x = sde.prior_sample(key, shape) if x_T is None else x_T
    drift = sde.probability_flow(score_fn)

    def vector_field(y, t):
        return drift(y, jnp.full((batch,), t, jnp.float32))

    x, nfe = solve_ode(
        vector_field, x, sde.T, eps, solver=solver, rtol=rtol, atol=atol, max_steps=max_steps
    )
    if denoise:
        t_eps = jnp.full((batch,), eps, jnp.float32)
        x = sde.x0_from_score(x, score_fn(x, t_eps), t_eps)
        nfe = nfe + 1
    return SampleOutput(x, None, None, nfe)


# ---------------------------------------------------------------- samplers.sample entries


def _grid_step(cur, nxt, x):
    step = step_of_alpha_bars(cur.alpha_bar, nxt.alpha_bar)
    return step, _e(nxt.alpha_bar >= 1.0, x)


def _grid_score(denoise, cur):
    """score_at(x) at the grid point cur: -eps_hat / sqrt(1 - abar)."""

    def score_at(x):
        _, eps_hat = denoise(x, cur.t)
        return -eps_hat / _e(jnp.sqrt(1.0 - cur.alpha_bar), x)

    return score_at


@register_sampler("euler_maruyama")
def euler_maruyama_step(denoise, x, carry, cur, nxt, key):
    """Euler-Maruyama on the reverse VP-SDE with beta integrated over each grid step."""
    step, is_last = _grid_step(cur, nxt, x)
    x = _pc_update(
        _grid_score(denoise, cur), x, step, key, is_last, "euler_maruyama", "none", 0.0, 0
    )
    return x, carry


@register_sampler("pc")
def pc_step(
    denoise,
    x,
    carry,
    cur,
    nxt,
    key,
    *,
    predictor="reverse_diffusion",
    corrector="langevin",
    snr=0.16,
    corrector_steps=1,
):
    """Predictor-corrector (Song et al. 2021, Algorithm 2 for VP) on the schedule's grid."""
    _check(predictor, corrector, corrector_steps)
    step, is_last = _grid_step(cur, nxt, x)
    x = _pc_update(
        _grid_score(denoise, cur),
        x,
        step,
        key,
        is_last,
        predictor,
        corrector,
        snr,
        corrector_steps,
    )
    return x, carry


@register_sampler("ode", grid="adaptive")
def ode_run(
    denoise,
    schedule: DiscreteSchedule,
    x_T,
    key,
    *,
    solver="tsit5",
    rtol=1e-5,
    atol=1e-5,
    max_steps=MAX_STEPS,
):
    """The probability-flow ODE of the schedule's VP process with an adaptive solver.

    Integrated in the half log-SNR lambda = log(sqrt(abar) / sqrt(1 - abar)), whatever the
    schedule: dx/dlambda = (1 - abar) x - sqrt(1 - abar) eps_hat (eq. 13 for VP in that
    clock; the DDIM ODE of Song et al. 2021a eq. 14 in VP coordinates, as DPM-Solver writes
    it). The network's time for lambda inverts the schedule's log-SNR. This clock takes about
    half the evaluations of sigma = exp(-lambda) at the same tolerance. Integrates from the
    last grid point to the first, then returns x0_hat there, as the grid samplers end on
    x0_hat. nfe = solver evaluations + 1.
    """
    del key
    ab = np.asarray(schedule.alphas_cumprod, np.float64)  # numpy: concrete under jit
    log_snr = np.log(ab) - np.log1p(-ab)
    batch = x_T.shape[0]

    def at(x, lam):
        t = jnp.full((batch,), schedule.time_at_log_snr(2.0 * lam))
        return denoise(x, t)

    def vector_field(x, lam):
        one_minus_ab = jax.nn.sigmoid(-2.0 * lam)
        _, eps_hat = at(x, lam)
        return one_minus_ab * x - jnp.sqrt(one_minus_ab) * eps_hat

    lam_T, lam_0 = 0.5 * log_snr[-1], 0.5 * log_snr[0]
    x, nfe = solve_ode(
        vector_field, x_T, float(lam_T), float(lam_0), solver=solver, rtol=rtol, atol=atol,
        max_steps=max_steps,
    )  # fmt: skip
    return at(x, jnp.asarray(lam_0, jnp.float32))[0], nfe + 1
