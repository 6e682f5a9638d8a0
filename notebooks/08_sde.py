# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 08 — Diffusion in continuous time: SDEs, PC vs ODE vs DDIM, exact likelihood
#
# Song et al. (2021) write diffusion as an SDE dx = f(t) x dt + g(t) dW. Its reverse-time SDE
# samples with predictor-corrector (PC) steps, and its **probability-flow ODE** has the same
# marginals, so an adaptive ODE solver samples deterministically and the instantaneous
# change of variables gives **exact log-likelihoods**. Karras et al. (2022, EDM) train the
# denoiser with a preconditioning and sample with Heun's method on the rho = 7 grid.
#
# 1. the three SDEs (VP, sub-VP, VE) side by side;
# 2. a DDPM model (configs/ddpm.py:cpu) and an EDM model (configs/edm.py:cpu) of the same
#    size, batch and training steps, sampled by PC, the ODE, DDIM, DPM-Solver++ and EDM's
#    Heun at comparable network evaluations (FD in a judge classifier's features and the
#    judge's accuracy on the asked class);
# 3. bits/dim on test images: the ODE likelihood vs the variational bound.
#
# Self-contained: the judge (configs/classifier.py:cpu,clean) and both models are trained
# into `root` unless there already; a second run reuses them. Full size: about 5 minutes on
# one H200 shared with seven other notebooks (the sizes below), hours on a 2-core CPU.

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from diffax_lab import api
from diffax_lab.data import load_split
from diffax_lab.diffusion import sde as sde_lib

# %% tags=["parameters"]
small = False  # True: the CI's seconds-long run
root = "workdirs/notebooks/08_sde"  # ROOT/judge, ROOT/ddpm, ROOT/edm
data_dir = ""  # '' = Fashion-MNIST from $DIFFAX_DATA_DIR or the Debian package
judge_workdir = ""  # a clean 28x28 classifier; '' = train configs/classifier.py:cpu,clean
judge_steps = 400  # ... for this many steps of judge_batch images into ROOT/judge
judge_batch = 256
train_steps = 800  # both models: configs/*.py:cpu's U-Net, these steps of train_batch images
train_batch = 128
num_samples = 1000  # per sampler setting (FD, accuracy)
sample_batch = 250  # images per compiled sampler call
nfe = 20  # network evaluations per sample for the fixed-step samplers
ode_tolerances = (1e-2, 1e-3)
bpd_examples = 256  # test images for both bits/dim figures (one batch)
bpd_probes = 2  # Hutchinson-Skilling probes per image of the ODE likelihood

# %%
common = {
    "train.num_steps": train_steps,
    "train.batch_size": train_batch,
    "model.num_classes": 10,  # conditional (w = 0 at sampling): the judge's accuracy applies
    "train.p_uncond": 0.1,
    "sample.batch_size": sample_batch,
    "sample.rtol": min(ode_tolerances),  # the ODE of run.sample (the pictures at the end)
    "sample.atol": min(ode_tolerances),
    "eval.num_reference": 2000,
    "eval.floor": False,
    "eval.kid_subset_size": 100,
    "eval.kid_num_subsets": 10,
}
judge_overrides = {"train.num_steps": judge_steps, "train.batch_size": judge_batch}
train_judge = not judge_workdir
judge_workdir = judge_workdir or f"{root}/judge"
common["eval.judge_workdir"] = judge_workdir
if small:
    common.update(
        {
            "model.base_channels": 8,
            "train.num_steps": 2,
            "train.batch_size": 8,
            "optim.warmup_steps": 1,
            "sample.batch_size": 8,
            "eval.num_reference": 16,
            "eval.kid_subset_size": 4,
            "eval.ode_probes": 2,
            "eval.ode_rtol": 1e-2,
            "eval.ode_atol": 1e-2,
            "sample.rtol": 1e-2,  # one ODE tolerance: the table's, also drawn in section 4
            "sample.atol": 1e-2,
        }
    )
    ode_tolerances = (1e-2,)
    judge_overrides.update(
        {"train.num_steps": 2, "train.batch_size": 8, "model.base_channels": 8,
         "optim.warmup_steps": 1}
    )  # fmt: skip
    num_samples, nfe, bpd_examples, sample_batch = 8, 4, 4, 8
if data_dir:
    common["data.dir"] = judge_overrides["data.dir"] = data_dir
configs = {name: api.config(f"{name}:cpu", **common) for name in ("ddpm", "edm")}
judge_config = api.config("classifier:cpu,clean", **judge_overrides)
assert judge_config.data.image_size == configs["ddpm"].data.image_size  # 28: the judge fits

# %% [markdown]
# ## 1. The three SDEs
# Each has Gaussian marginals x_t = scale(t) x_0 + std(t) eps (closed forms in
# `diffusion/sde.py`): VP keeps the variance at 1, sub-VP stays below it, VE only adds noise.

# %%
t = jnp.linspace(1e-3, 1.0, 200)
sdes = {"VP": sde_lib.VPSDE(), "sub-VP": sde_lib.SubVPSDE(), "VE": sde_lib.VESDE()}
fig, axes = plt.subplots(1, 3, figsize=(12, 3))
for name, s in sdes.items():
    scale, std = s.marginal_coeffs(t)
    axes[0].plot(t, scale, label=name)
    axes[1].plot(t, std, label=name)
    axes[2].plot(t, 2 * (jnp.log(scale) - jnp.log(std)), label=name)
axes[0].set(xlabel="t", ylabel="scale(t)")
axes[1].set(xlabel="t", ylabel="std(t)", yscale="log")
axes[2].set(xlabel="t", ylabel="log-SNR")
axes[0].legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# One test image pushed through each forward SDE (x_t drawn from the closed-form marginal):

# %%
x0 = jnp.asarray(load_split(configs["ddpm"].data, "test")[0][0], jnp.float32) / 127.5 - 1
times = jnp.asarray([0.0, 0.1, 0.25, 0.5, 0.75, 1.0])
noise = jax.random.normal(jax.random.PRNGKey(0), (len(times), *x0.shape))
rows = []
for s in sdes.values():
    mean, std = s.marginal(jnp.broadcast_to(x0, noise.shape), jnp.maximum(times, 1e-3))
    xt = mean + std[:, None, None, None] * noise
    rows.append(np.asarray(jnp.clip((xt + 1) * 127.5, 0, 255)).astype(np.uint8))
api.show(np.concatenate(rows), titles=[f"{n} t={float(x):g}" for n in sdes for x in times], ncols=6)

# %% [markdown]
# ## 2. Two models, the same U-Net and training: DDPM (eps, linear VP) and EDM

# %%
if train_judge:  # (a finished workdir is only loaded)
    api.train(judge_config, judge_workdir, progress=False)
judge = api.load(judge_workdir)
judge_accuracy = judge.evaluate(
    metrics=("accuracy",), overrides={"eval.num_examples": 16 if small else 2000}
)["test_accuracy"]
runs = {name: api.train(cfg, f"{root}/{name}", progress=False) for name, cfg in configs.items()}
print(f"judge: test accuracy {judge_accuracy:.3f} after {judge.step} steps ({judge_workdir})")
pd.concat({n: r.metrics[["step", "loss"]].tail(3) for n, r in runs.items()})

# %% [markdown]
# Sampler settings at about `nfe` evaluations (PC: a predictor and a Langevin corrector
# step each, so nfe / 2 steps; EDM's Heun: 2 steps - 1), and the ODE at two tolerances,
# whose evaluations the solver chooses (counted below on one batch).

# %%
settings = {
    "DDIM": dict(sampler="ddim", steps=nfe),
    "DPM-Solver++(2M)": dict(sampler="dpm_solver++", steps=nfe),
    "PC (RD + Langevin)": dict(sampler="pc", steps=nfe // 2),
    "EDM Heun": dict(sampler="edm", steps=(nfe + 1) // 2),
    **{
        f"ODE tol {tol:g}": dict(
            sampler="ode", steps=0, overrides={"sample.rtol": tol, "sample.atol": tol}
        )
        for tol in ode_tolerances
    },
}


def ode_nfe(run, tol):
    """Network evaluations of the adaptive ODE sampler on one batch."""
    task = run.task_for(
        {"sample.sampler": "ode", "sample.num_steps": 0, "sample.rtol": tol, "sample.atol": tol}
    )
    cond = jnp.asarray(np.resize(np.arange(10), task.config.sample.batch_size))
    out = task.sample_batch(
        run.params, jax.random.PRNGKey(0), cond, jnp.float32(0), None, None, jnp.float32(0),
        num_traj=0,
    )  # fmt: skip
    return int(out.nfe)


rows = []
for model, run in runs.items():
    for label, s in settings.items():
        o = {"sample.sampler": s["sampler"], "sample.num_steps": s["steps"]}
        o.update(s.get("overrides", {}))
        r = run.evaluate(metrics=("fd",), num_samples=num_samples, overrides=o)
        n = ode_nfe(run, o["sample.rtol"]) if s["sampler"] == "ode" else None
        n = n or {"EDM Heun": 2 * s["steps"] - 1, "PC (RD + Langevin)": 2 * s["steps"]}.get(
            label, s["steps"]
        )
        rows.append(
            {"model": model, "sampler": label, "nfe": n, "fd": r["fd"],
             "accuracy": r.get("class_accuracy")}
        )  # fmt: skip
results = pd.DataFrame(rows)
results.pivot_table(index="sampler", columns="model", values=["nfe", "fd", "accuracy"]).round(3)

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
for model, d in results.groupby("model"):
    ax.scatter(d["nfe"], d["fd"], label=model)
    for _, row in d.iterrows():
        ax.annotate(row["sampler"], (row["nfe"], row["fd"]), fontsize=7)
ax.set(xlabel="network evaluations", ylabel="FD (judge features)", xscale="log")
ax.legend()
plt.show()

# %% [markdown]
# ## 3. Bits/dim: the exact ODE likelihood vs the variational bound
# `bpd` is DDPM's bound on the discrete model (an upper bound on -log2 p); `ode_bpd`
# integrates the probability-flow ODE with Hutchinson-Skilling traces and uniform
# dequantization (also an upper bound, in expectation). Both on the same test images.

# %%
bpd_rows = {}
for model, run in runs.items():
    r = run.evaluate(
        metrics=("bpd", "ode_bpd"),
        overrides={
            "eval.bpd_num_examples": bpd_examples,
            "eval.ode_num_examples": bpd_examples,
            "eval.batch_size": bpd_examples,
            "eval.ode_probes": bpd_probes,
        },
    )
    bpd_rows[model] = {
        k: r[k] for k in ("bpd", "bpd_sem", "ode_bpd", "ode_bpd_sem", "ode_nfe") if k in r
    }
pd.DataFrame(bpd_rows).transpose().round(3)

# %% [markdown]
# ## 4. Samples of both models, the same noise: EDM's Heun and the ODE (tolerance
# min(ode_tolerances)), drawn by the compiled samplers of the table above.

# %%
for model, run in runs.items():
    for sampler, steps in (("edm", (nfe + 1) // 2), ("ode", 0)):
        images = run.sample(sample_batch, sampler=sampler, steps=steps, seed=0)
        api.show(images[:16], ncols=8, title=f"{model}: {sampler}")
