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
# # 03 — Samplers: error vs steps, then FD and class accuracy vs network evaluations
#
# DDPM, DDIM, DPM-Solver++(2M), Euler and Heun (Karras) from `diffusion/samplers.py`.
# First on an analytic target (a Gaussian mixture whose exact noise predictor stands in for
# a perfect network: the error is the sampler's alone), then on one trained class-
# conditional model, judged by the clean classifier (FD in its features, and how often it
# names the class asked for).

# %%
import jax
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from diffax_lab import api
from diffax_lab.diffusion import analytic, samplers
from diffax_lab.diffusion.schedules import get_schedule

# %% tags=["parameters"]
small = False  # True: the CI's seconds-long run (tests/test_notebooks.py injects it)
root = "workdirs/notebooks"  # the conditional model is trained in ROOT/cond16 if needed
data_dir = ""  # '' = Fashion-MNIST from $DIFFAX_DATA_DIR or the Debian package
model_workdir = ""  # a trained diffusion run; '' = train ROOT/cond16 (shared with 04)
judge_workdir = "workdirs/judge16"  # clean classifier at the model's image size
cond_steps = 400  # training steps of ROOT/cond16
step_counts = (5, 10, 20, 50)  # sampler steps tried on the trained model
analytic_steps = (2, 5, 10, 20, 50, 100)  # ... and on the analytic target
num_samples = 256  # samples per point for FD / accuracy
SAMPLERS = ("ddpm", "ddim", "dpm_solver++", "euler", "heun")

# %%
if small:
    step_counts, analytic_steps, num_samples = (2,), (2,), 4
    SAMPLERS = ("ddim", "heun")
    judge_workdir = ""

# %% [markdown]
# ## On the analytic target (sliced Wasserstein-1 to fresh draws; T = 1000, linear)

# %%
dim, n = (4, 64) if small else (16, 4000)
means = np.stack([np.full(dim, 0.5), np.full(dim, -0.5)]).astype(np.float32)
stds, weights = np.array([0.1, 0.1], np.float32), np.array([0.5, 0.5], np.float32)
schedule = get_schedule("linear", 1000)
model_fn = analytic.gaussian_mixture_model_fn(schedule, means, stds, weights)
rng = np.random.default_rng(0)
directions = rng.standard_normal((50, dim))
directions /= np.linalg.norm(directions, axis=1, keepdims=True)


def target(m):
    k = rng.choice(2, m, p=weights)
    return means[k] + stds[k, None] * rng.standard_normal((m, dim))


def sliced_w1(a, b):
    return float(np.mean(np.abs(np.sort(a @ directions.T, 0) - np.sort(b @ directions.T, 0))))


def nfe_of(sampler, k):
    """Network evaluations of k steps: Heun corrects every step but the last (2k - 1)."""
    return 2 * k - 1 if sampler == "heun" else k


rows = []
for sampler in SAMPLERS:
    for k in analytic_steps:
        out = jax.jit(
            lambda key, sampler=sampler, k=k: samplers.sample(
                model_fn, schedule, (n, dim), key, sampler=sampler, num_steps=k, clip_x0=None
            )
        )(jax.random.PRNGKey(0))
        nfe = nfe_of(sampler, k)
        rows.append(
            {
                "sampler": sampler,
                "steps": k,
                "nfe": nfe,
                "w1": sliced_w1(np.asarray(out.samples), target(n)),
            }
        )
analytic_df = pd.DataFrame(rows)
analytic_df.pivot_table(index="sampler", columns="steps", values="w1").round(4)

# %%
fig, ax = plt.subplots(figsize=(5.5, 3.5))
for sampler, d in analytic_df.groupby("sampler"):
    ax.plot(d["nfe"], d["w1"], "o-", label=sampler)
ax.set(xscale="log", yscale="log", xlabel="network evaluations", ylabel="sliced W1 to target")
ax.legend(fontsize=7)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## On a trained model: FD and class accuracy vs network evaluations

# %%
if not model_workdir:
    model_workdir = f"{root}/cond16"
    over = {
        "data.image_size": 16,
        "model.base_channels": 16,
        "model.num_classes": 10,
        "train.p_uncond": 0.1,
        "train.batch_size": 32,
        "train.num_steps": cond_steps,
        "train.checkpoint_every": 100,
        "optim.warmup_steps": 50,
        "eval.batch_size": 256,
    }
    if data_dir:
        over["data.dir"] = data_dir
    run = api.train(api.config("ddpm:cpu", **over), model_workdir)  # trains or resumes
else:
    run = api.load(model_workdir)
print(run)

# %%
rows = []
ev = {
    "eval.judge_workdir": judge_workdir,
    "eval.num_reference": 1000,
    "eval.kid_subset_size": min(100, num_samples),
    "eval.kid_num_subsets": 10,
    "eval.floor": False,
}
for sampler in SAMPLERS:
    for k in step_counts:
        row = {"sampler": sampler, "steps": k, "nfe": nfe_of(sampler, k)}
        if judge_workdir:
            r = run.evaluate(
                ("fd",), num_samples, sampler=sampler, steps=k, guidance=0.0, overrides=ev
            )
            row.update({m: r.get(m) for m in ("fd", "class_accuracy", "recall", "sample_seconds")})
        else:  # no judge: the samples are drawn, nothing is scored
            row["mean_pixel"] = float(run.sample(num_samples, sampler=sampler, steps=k).mean())
        rows.append(row)
model_df = pd.DataFrame(rows)
model_df.round(3)

# %%
if judge_workdir:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    for sampler, d in model_df.groupby("sampler"):
        a1.plot(d["nfe"], d["fd"], "o-", label=sampler)
        a2.plot(d["nfe"], d["class_accuracy"], "o-", label=sampler)
    a1.set(xscale="log", xlabel="network evaluations", ylabel="FD (judge features)")
    a2.set(xscale="log", xlabel="network evaluations", ylabel="class accuracy (judge)")
    a1.legend(fontsize=7)
    fig.tight_layout()
    plt.show()

# %%
api.show(
    np.concatenate([run.sample(8, sampler=s, steps=step_counts[-1], seed=0) for s in SAMPLERS]),
    titles=[s for s in SAMPLERS for _ in range(8)],
    ncols=8,
)
