"""Sampler error against closed forms, versus the number of steps (no network, no training).

    python -m benchmarks.sampler_errors [--schedule=linear] [--num=4000] [--nodiffusers]

Target: Gaussian data N(0.5, 0.3^2), driven by its exact optimal eps-predictor
(diffax_lab/diffusion/analytic.py). Columns:
- ode_err, ode_max_err: mean and max |x_0 - x_0^exact| over samples from the same x_T,
  where x_0^exact is the probability-flow ODE's exact solution (deterministic samplers only);
- mean_err, std_rel_err: error of the sample mean and relative error of the sample std
  (all samplers; includes Monte Carlo error of about 0.3 / sqrt(num)).
The ``diffusers_dpm_solver++`` rows run diffusers' DPMSolverMultistepScheduler with its
default settings on the same betas, model and x_T, below T steps (needs the ``peer`` extra:
torch and diffusers; ``--nodiffusers`` leaves them out). Prints one JSON line per
(sampler, steps).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from diffax_lab.diffusion import analytic, samplers, schedules


def define_flags():
    """Defines this script's flags; called only when it runs as a script, so that
    importing it (tests, notebooks, other benchmarks) defines no global flags."""
    flags.DEFINE_string("schedule", "linear", "Noise schedule.")
    flags.DEFINE_integer("num", 4000, "Samples per run.")
    flags.DEFINE_bool("diffusers", True, "Add rows for diffusers' DPMSolverMultistepScheduler.")


FLAGS = flags.FLAGS
MEAN, STD = 0.5, 0.3
STEPS = (10, 20, 50, 100, 1000)
DIFFUSERS_DPM = "diffusers_dpm_solver++"


def diffusers_dpm_solver(model_fn, schedule, x_T, num_steps: int) -> np.ndarray:
    """x_0 from diffusers' DPMSolverMultistepScheduler, default settings (DPM-Solver++(2M)),
    on ``schedule``'s betas, driven by our ``model_fn(x_t, t) -> eps`` from x_T [B, ...]."""
    try:
        import torch
        from diffusers import DPMSolverMultistepScheduler
    except ImportError as e:
        raise ImportError(
            f"The diffusers rows need torch and diffusers ({e}): pip install -e .[peer], "
            "or pass --nodiffusers."
        ) from e
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=schedule.num_steps, trained_betas=np.asarray(schedule.betas)
    )
    scheduler.set_timesteps(num_steps)
    times = np.asarray(schedule.times)
    eps_fn = jax.jit(model_fn)
    x = torch.from_numpy(np.array(x_T, np.float32))
    for k in scheduler.timesteps:
        t = jnp.full((x.shape[0],), times[int(k)])  # diffusers' step k is our time (k + 1) / T
        eps = torch.from_numpy(np.array(eps_fn(jnp.asarray(x.numpy()), t)))
        x = scheduler.step(eps, k, x).prev_sample
    return x.numpy()


def main(argv):
    del argv
    s = schedules.get_schedule(FLAGS.schedule, 1000)
    model_fn = analytic.gaussian_model_fn(s, jnp.array([MEAN]), STD)
    x_T = jax.random.normal(jax.random.PRNGKey(3), (FLAGS.num, 1))
    ab_T = float(s.alphas_cumprod[-1])
    exact = MEAN + STD * (np.asarray(x_T) - np.sqrt(ab_T) * MEAN) / np.sqrt(
        ab_T * STD**2 + 1 - ab_T
    )
    names = ("ddpm", "ddim", "dpm_solver++", "euler", "heun")
    for name in names + ((DIFFUSERS_DPM,) if FLAGS.diffusers else ()):
        for steps in STEPS:
            if name == DIFFUSERS_DPM and steps >= s.num_steps:
                continue  # its linspace grid repeats steps at num_steps = T (h = 0: NaN)
            if name == DIFFUSERS_DPM:
                x = diffusers_dpm_solver(model_fn, s, x_T, steps)
            else:
                fn = jax.jit(
                    lambda k, name=name, steps=steps: (
                        samplers.sample(
                            model_fn,
                            s,
                            (FLAGS.num, 1),
                            k,
                            sampler=name,
                            num_steps=steps,
                            x_T=x_T,
                            clip_x0=None,  # the Gaussian target is unbounded
                        ).samples
                    )
                )
                x = np.asarray(fn(jax.random.PRNGKey(0)))
            row = {
                "schedule": FLAGS.schedule,
                "sampler": name,
                "steps": steps,
                "mean_err": float(abs(x.mean() - MEAN)),
                "std_rel_err": float(abs(x.std() - STD) / STD),
            }
            if name != "ddpm":
                row["ode_err"] = float(np.mean(np.abs(x - exact)))
                row["ode_max_err"] = float(np.max(np.abs(x - exact)))
            print(json.dumps(row))


if __name__ == "__main__":
    define_flags()
    app.run(main)
