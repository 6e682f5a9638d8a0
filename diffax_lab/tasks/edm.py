"""The EDM task (``config.task = "edm"``; configs/edm.py): a U-Net trained as a denoiser
D(x; sigma) of data plus noise of level sigma, y = x_0 + sigma n, in one of two
parametrisations (``diffusion.preconditioning``):

- ``edm`` (Karras et al. 2022, Table 1): D = c_skip x + c_out F(c_in x, c_noise), sigma
  log-normal (ln sigma ~ N(P_mean, P_std^2), -1.2 and 1.2), loss weight
  lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (``diffusion/edm.py``);
- ``ve`` (the VE SDE of Song et al. 2021 / NCSN++): a sigma-conditioned score network,
  score = F(x, c_noise) / sigma, so D = x + sigma F; sigma one of ``diffusion.num_scales``
  geometric levels from sigma_min to sigma_max (0: sigma(t) = sigma_min (sigma_max /
  sigma_min)^t with t uniform), denoising score matching weighted by lambda(sigma) = sigma^2
  (``losses.get_ve_loss_fn``).

VE training is a config of this task (configs/edm.py:ve) rather than a task of its own:
both are sigma-conditioned denoisers that differ only in D's parametrisation and the loss,
and everything else (sampling, guidance, evaluation) is shared. In both the network sees
c_noise = ln(sigma) / 4 through the U-Net's time embedding (EDM's c_noise; NCSN++ also
conditions on log sigma).

Sampling: the samplers of the registry call a network of VP states x_t at the continuous
times of a schedule (``DenoisingTask.generate``). This task's schedule is geometric in sigma
between diffusion.sigma_min and sigma_max over diffusion.num_timesteps steps (alpha_bar =
1 / (1 + sigma^2); the VE SDE's discretisation), and the network as the samplers see it
(``model_fn``) predicts x_0 = D(x_t sqrt(1 + sigma^2); sigma) at the sigma of time t
(``diffusion.prediction = "x0"``). So every sampler of the registry works unchanged: ``heun``
(Karras Algorithm 1 on the rho = 7 grid of this sigma range: with sigma 0.002 ... 80 it is
EDM's deterministic sampler), ``edm`` (Algorithm 2 with sample.S_churn, S_tmin, S_tmax,
S_noise; at S_churn = 0 the same as ``heun``), ``ddim``, ``ddpm``, ``dpm_solver++``,
``euler``, ``pc`` (reverse diffusion + Langevin) and ``ode`` (the probability-flow ODE with
a diffrax solver). The diffusion section's ``schedule``, ``loss_weighting`` and
``min_snr_gamma`` are not used here. Classifier-free guidance is DenoisingTask's: the two
passes of F are combined linearly, which is the same combination of D (and of eps).

The ``ode_bpd`` evaluator takes this task's probability-flow ODE from ``likelihood_sde``:
the VE SDE between sigma_min and sigma_max with score (D(x; sigma) - x) / sigma^2.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from diffax_lab.config_lib import check_choice, check_number
from diffax_lab.data import pipeline
from diffax_lab.diffusion import edm, guidance, process
from diffax_lab.diffusion.losses import get_ve_loss_fn
from diffax_lab.diffusion.schedules import DiscreteSchedule
from diffax_lab.diffusion.sde import VESDE
from diffax_lab.errors import ConfigError
from diffax_lab.tasks.denoising import DenoisingTask
from diffax_lab.tasks.registry import register

PRECONDITIONINGS = ("edm", "ve")


def sigma_schedule(sigma_min: float, sigma_max: float, num_timesteps: int) -> DiscreteSchedule:
    """A VP schedule whose sigma = sqrt((1 - abar) / abar) is geometric from sigma_min (step
    1, t = 1/T) to sigma_max (step T, t = 1); built in float64, stored in float32 (alpha_bar
    near 1 resolves sigma_min = 0.002 to within 1%)."""
    if num_timesteps < 2:
        raise ValueError(f"diffusion.num_timesteps must be >= 2, got {num_timesteps}.")
    sigmas = np.exp(np.linspace(np.log(sigma_min), np.log(sigma_max), num_timesteps))
    abar = 1.0 / (1.0 + sigmas**2)
    betas = 1.0 - abar / np.concatenate([[1.0], abar[:-1]])
    times = np.arange(1, num_timesteps + 1, dtype=np.float64) / num_timesteps
    return DiscreteSchedule(
        betas=jnp.asarray(betas, jnp.float32),
        alphas_cumprod=jnp.asarray(abar, jnp.float32),
        times=jnp.asarray(times, jnp.float32),
    )


def c_noise(sigma):
    """The network's noise input, ln(sigma) / 4 (EDM Table 1)."""
    return 0.25 * jnp.log(sigma)


@register
class EDMTask(DenoisingTask):
    name = "edm"
    metrics = (*DenoisingTask.metrics, "ode_bpd")

    @classmethod
    def check_config(cls, config) -> None:
        super().check_config(config)
        d = config.diffusion
        check_choice(config, "diffusion.preconditioning", PRECONDITIONINGS)
        check_number(config, "diffusion.sigma_min", low=0.0, low_open=True)
        check_number(config, "diffusion.sigma_max", low=0.0, low_open=True)
        if d.sigma_max <= d.sigma_min:
            raise ConfigError(
                f"config.diffusion.sigma_max={d.sigma_max} must exceed "
                f"diffusion.sigma_min={d.sigma_min}."
            )
        check_number(config, "diffusion.sigma_data", low=0.0, low_open=True)
        check_number(config, "diffusion.p_std", low=0.0, low_open=True)
        check_number(config, "diffusion.p_mean", low=-1e3, high=1e3)
        check_number(config, "diffusion.num_scales", low=0, integer=True)
        if d.num_scales == 1:
            raise ConfigError(
                "config.diffusion.num_scales=1: use 0 (continuous sigma) or >= 2 levels."
            )
        if d.num_timesteps < 2:
            raise ConfigError("config.diffusion.num_timesteps must be >= 2 (the sigma grid).")
        if d.prediction != "x0":
            raise ConfigError(
                f"config.diffusion.prediction={d.prediction!r}: the EDM task's network, as the "
                "samplers see it, predicts x0 (the denoiser D); set diffusion.prediction='x0'."
            )
        if config.sample.classifier_scale > 0:
            raise ConfigError(
                "config.sample.classifier_scale > 0: classifier guidance is not supported by "
                "the edm task (its classifiers are trained on the linear schedule's x_t); use "
                "classifier-free guidance (model.num_classes, train.p_uncond, "
                "sample.guidance_scale)."
            )
        if config.model.cond_dim:
            raise ConfigError(
                "config.model.cond_dim > 0: the edm task conditions on class labels only "
                "(model.num_classes)."
            )

    def build(self):
        super().build()
        d = self.config.diffusion
        self.schedule = sigma_schedule(d.sigma_min, d.sigma_max, d.num_timesteps)
        self.ve_sde = VESDE(sigma_min=d.sigma_min, sigma_max=d.sigma_max)
        if d.preconditioning == "edm":
            self.loss_fn = edm.get_loss_fn(d.sigma_data, d.p_mean, d.p_std)
        else:
            ve_loss = get_ve_loss_fn(self.ve_sde, d.num_scales or None)

            def loss_fn(net_fn, x0, key):
                return ve_loss(lambda x, sigma: net_fn(x, c_noise(sigma)), x0, key)

            self.loss_fn = loss_fn

    # ----- the network: raw F, the denoiser D, and D as the samplers see it -----
    def net_fn(self, params, cond=None, *, train=False, rngs=None, key=None):
        """F(x_in, c_noise): the raw U-Net, c_noise in its time input."""
        return DenoisingTask.model_fn(self, params, cond, train=train, rngs=rngs, key=key)

    def denoiser_fn(self, net_fn):
        """D(x, sigma) [B, ...] from the raw network, per diffusion.preconditioning."""
        d = self.config.diffusion
        if d.preconditioning == "edm":
            return edm.make_denoiser(net_fn, d.sigma_data)

        def denoiser(x, sigma):  # score = F / sigma, D = x + sigma^2 score
            out = net_fn(x, c_noise(sigma)).astype(jnp.float32)
            return x + process.expand_to(sigma, x) * out

        return denoiser

    def x0_at_time(self, denoiser):
        """(x_t, t) -> x0_hat for VP states at the schedule's continuous times."""

        def fn(x_t, t):
            sigma = jnp.exp(-0.5 * self.schedule.log_snr_at(t))
            x_ve = x_t * process.expand_to(jnp.sqrt(1.0 + jnp.square(sigma)), x_t)
            return denoiser(x_ve, sigma)

        return fn

    def model_fn(self, params, cond=None, *, train=False, rngs=None, key=None):
        """(x_t, t) -> x0_hat: the denoiser at the sigma of time t (what samplers and the
        variational bound call)."""
        net = self.net_fn(params, cond, train=train, rngs=rngs, key=key)
        return self.x0_at_time(self.denoiser_fn(net))

    def train_loss(self, params, x0, labels, keys):
        drop_key, loss_key, dropout_key = keys
        cond = labels if self.uses_condition else None
        fn = self.net_fn(params, cond, train=True, rngs={"dropout": dropout_key}, key=drop_key)
        return self.loss_fn(fn, x0, loss_key)

    def eval_loss(self, params, x_u8, cond, key):
        fn = self.net_fn(params, cond if self.uses_condition else None)
        return self.loss_fn(fn, pipeline.to_model_range(x_u8), key)

    def guided_model_fn(
        self, params, cond, guidance_scale, classifier_params=None, classifier_scale=0.0
    ):
        """DenoisingTask's, with CFG's two passes of F combined before the preconditioning
        (the same linear combination of D)."""
        if classifier_params is not None:
            raise ValueError("The edm task has no classifier guidance (see check_config).")
        null = self.uncond_kwargs(cond) if cond is not None else None
        if null is None:
            return self.model_fn(params, cond)

        def apply(x, noise, **kw):
            return self.model.apply({"params": params}, x, noise, **kw)

        raw = guidance.classifier_free(apply, self.condition_kwargs(cond), null, guidance_scale)
        return self.x0_at_time(self.denoiser_fn(raw))

    # ----- the probability-flow ODE for the ode_bpd evaluator -----
    def likelihood_sde(self):
        """(sde, score_fn(x, t, (params, cond))): the VE SDE of sigma_min ... sigma_max with
        score (D(x; sigma(t)) - x) / sigma(t)^2 (Tweedie)."""
        sde = self.ve_sde

        def score_fn(x, t, args):
            params, cond = args
            den = self.denoiser_fn(self.net_fn(params, cond if self.uses_condition else None))
            sigma = sde.sigma(t)
            return (den(x, sigma) - x) / process.expand_to(jnp.square(sigma), x)

        return sde, score_fn
