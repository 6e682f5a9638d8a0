"""``ode_bpd``: bits/dim of test images by the probability-flow ODE (Song et al. 2021, App.
D.2; ``metrics.ode_likelihood``), with the EMA weights, each image conditioned as in training.

The images are dequantized uniformly (an upper bound on the discrete bits/dim in
expectation), and the divergence is Hutchinson-Skilling's estimate with ``eval.ode_probes``
probes of kind ``eval.ode_probe`` (rademacher | gaussian), integrated from t = eval.ode_eps
to 1 by ``eval.ode_solver`` with ``eval.ode_rtol`` / ``eval.ode_atol``, on
``eval.ode_num_examples`` test images. Reported: the mean bits/dim, its standard error over
images (``ode_bpd_sem``), the trace estimator's share of each image's error (mean of the
per-image Hutchinson standard errors, ``ode_bpd_hutchinson_sem``; None with one probe) and
the solver's network evaluations per batch (``ode_nfe``, each one forward pass plus
``ode_probes`` Jacobian-vector products).

The SDE: a task's ``likelihood_sde()`` -> (sde, score_fn(x, t, (params, cond))) when it
has one (the edm task: its VE SDE); otherwise the task's DDPM network as the VP-SDE of its
linear schedule (``sde.VPSDE.from_schedule``, the network called at the schedule's time of
the same log-SNR, ``sde.score_fn_from_model``); other schedules are refused at prepare.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from diffax_lab.data import load_split, pipeline
from diffax_lab.diffusion.sde import VPSDE, score_fn_from_model
from diffax_lab.diffusion.sde_samplers import SOLVERS
from diffax_lab.errors import ConfigError
from diffax_lab.evaluators import Context, EvaluatorBase
from diffax_lab.metrics.ode_likelihood import PROBES, ode_bits_per_dim

# Defaults of the eval fields (configs/ddpm.py has the same), for configs that lack them.
DEFAULTS = {
    "ode_num_examples": 256,
    "ode_probes": 4,
    "ode_probe": "rademacher",
    "ode_solver": "tsit5",
    "ode_rtol": 1e-5,
    "ode_atol": 1e-5,
    "ode_eps": 1e-3,
}


def _field(e, name):
    return e.get(name, DEFAULTS[name])


def check_fields(config) -> dict:
    """The ode_* eval fields, checked; ConfigError naming the field otherwise."""
    e = config.eval
    f = {n: _field(e, n) for n in DEFAULTS}
    for n in ("ode_num_examples", "ode_probes"):
        v = f[n]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"config.eval.{n}={v!r} must be an integer >= 1.")
    if f["ode_probe"] not in PROBES:
        raise ConfigError(f"config.eval.ode_probe={f['ode_probe']!r} must be one of {PROBES}.")
    if f["ode_solver"] not in SOLVERS:
        raise ConfigError(
            f"config.eval.ode_solver={f['ode_solver']!r} must be one of {tuple(SOLVERS)}."
        )
    for n in ("ode_rtol", "ode_atol"):
        v = f[n]
        if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
            raise ConfigError(f"config.eval.{n}={v!r} must be a number > 0.")
    v = f["ode_eps"]
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < 1:
        raise ConfigError(f"config.eval.ode_eps={v!r} must lie in (0, 1).")
    return f


def ddpm_likelihood_sde(task):
    """(VP-SDE of the task's linear schedule, score_fn(x, t, (params, cond)))."""
    try:
        sde = VPSDE.from_schedule(task.schedule)
    except ValueError as err:
        raise ConfigError(
            f"config.eval.metrics asks for 'ode_bpd', which takes a DDPM model as the VP-SDE "
            f"of its linear schedule; this one is diffusion.schedule="
            f"{task.config.diffusion.schedule!r}. ({err})"
        ) from None
    prediction = task.config.diffusion.prediction

    def score_fn(x, t, args):
        params, cond = args
        model = task.model_fn(params, cond if task.uses_condition else None)
        return score_fn_from_model(model, sde, prediction, task.schedule)(x, t)

    return sde, score_fn


class Evaluator(EvaluatorBase):
    def prepare(self):
        self.fields = check_fields(self.config)
        hook = getattr(self.task, "likelihood_sde", None)
        self.sde, self.score_fn = hook() if hook else ddpm_likelihood_sde(self.task)
        imgs, labels = load_split(self.config.data, "test")
        n = min(self.fields["ode_num_examples"], len(imgs))
        self.bs = min(self.config.eval.batch_size, n)
        n = n // self.bs * self.bs
        self.images = imgs[:n]
        self.conds = np.asarray(self.task.eval_conditions(labels, self.workdir))[:n]

    def run(self, ctx: Context) -> dict:
        f = self.fields
        key = jax.random.fold_in(ctx.key, 3)
        bpd, hutch, nfe = [], [], []
        for b in range(len(self.images) // self.bs):
            sl = slice(b * self.bs, (b + 1) * self.bs)
            out = ode_bits_per_dim(
                self.score_fn,
                self.sde,
                pipeline.to_model_range(self.images[sl]),
                jax.random.fold_in(key, b),
                score_args=(ctx.params, jnp.asarray(self.conds[sl])),
                num_probes=f["ode_probes"],
                probe=f["ode_probe"],
                solver=f["ode_solver"],
                rtol=float(f["ode_rtol"]),
                atol=float(f["ode_atol"]),
                eps=float(f["ode_eps"]),
            )
            bpd.append(out.bpd)
            hutch.append(out.hutchinson_stderr)
            nfe.append(out.nfe)
        bpd, hutch = np.concatenate(bpd), np.concatenate(hutch)
        return {
            "ode_bpd": float(bpd.mean()),
            "ode_bpd_sem": float(bpd.std(ddof=1) / math.sqrt(len(bpd))) if len(bpd) > 1 else None,
            "ode_bpd_hutchinson_sem": float(hutch.mean()) if f["ode_probes"] > 1 else None,
            "ode_nfe": float(np.mean(nfe)),
            "ode_num_examples": len(self.images),
            "ode_probes": f["ode_probes"],
            "ode_probe": f["ode_probe"],
            "ode_solver": f["ode_solver"],
            "ode_rtol": f["ode_rtol"],
            "ode_atol": f["ode_atol"],
            "ode_eps": f["ode_eps"],
            "ode_sde": type(self.sde).__name__,
        }
