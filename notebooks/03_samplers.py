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
#
# Self-contained: the class-conditional model (ROOT/cond16), its judge (ROOT/cond16_judge,
# `classifier:cpu,clean`) and the noise-conditioned classifier that 04 guides with
# (ROOT/cond16_noisy, `classifier:cpu`) are trained here when absent, at once, each in its
# own process; 04 (run after this notebook) finds them. Planned on an H200 shared with 7
# other notebooks, compile included: analytic target ~15 s (on the CPU); the three runs
# ~90 s (start and ~30 s of compiles each, 1500 / 1000 / 1500 steps at batch 128); FD and
# accuracy for 5 samplers x 3 step counts ~100 s (15 sampler programs of ~4-6 s compile,
# 500 samples each); samples ~10 s: ~3.5 minutes (04 then needs ~1.5).

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
root = "workdirs/notebooks"  # ROOT/cond16, ROOT/cond16_judge, ROOT/cond16_noisy (shared with 04)
data_dir = ""  # '' = Fashion-MNIST from $DIFFAX_DATA_DIR or the Debian package
model_workdir = ""  # a trained class-conditional run; '' = ROOT/cond16 (trained if absent)
judge_workdir = ""  # clean classifier at the model's image size; '' = ROOT/cond16_judge
cond_steps = 1500  # training steps of ROOT/cond16 (batch 128)
step_counts = (5, 10, 20)  # sampler steps tried on the trained model
analytic_steps = (2, 5, 10, 20, 50)  # ... and on the analytic target
num_samples = 500  # samples per point for FD / accuracy
SAMPLERS = ("ddpm", "ddim", "dpm_solver++", "euler", "heun")

# %%
# The three runs 03 and 04 share: keep this cell identical in both notebooks.
size = 16 if not small else 8
model_over = {
    "data.image_size": size,
    "model.base_channels": 32 if not small else 8,
    "model.num_groups": 8,
    "model.num_classes": 10,
    "train.p_uncond": 0.1,
    "train.batch_size": 128 if not small else 8,
    "train.num_steps": cond_steps if not small else 2,
    "train.checkpoint_every": 500,
    "optim.warmup_steps": 100,
    "eval.batch_size": 500 if not small else 16,
    "sample.batch_size": 250 if not small else 4,
}
judge_over = {
    "data.image_size": size,
    "train.batch_size": 128 if not small else 8,
    "train.num_steps": 1000 if not small else 2,
    "train.checkpoint_every": 1000,
}
noisy_over = {**judge_over, "train.num_steps": 1500 if not small else 2}
if small:
    model_over.update({"model.attention_resolutions": (), "model.mid_attention": False})
    for over in (judge_over, noisy_over):
        over.update({"eval.num_examples": 32, "eval.batch_size": 16})
if data_dir:
    for over in (model_over, judge_over, noisy_over):
        over["data.dir"] = data_dir
shared = {
    f"{root}/cond16": api.config("ddpm:cpu", **model_over),
    f"{root}/cond16_judge": api.config("classifier:cpu,clean", **judge_over),
    f"{root}/cond16_noisy": api.config("classifier:cpu", **noisy_over),
}

# %%
if small:
    step_counts, analytic_steps, num_samples = (2,), (2,), 8
    SAMPLERS = ("ddim", "heun")
    model_workdir = judge_workdir = ""  # its own 2-step runs: the whole path, class-conditional

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


try:  # 25 tiny programs: XLA:CPU compiles them faster than a GPU would
    analytic_device = jax.devices("cpu")[0]
except RuntimeError:
    analytic_device = jax.devices()[0]
rows = []
for sampler in SAMPLERS:
    for k in analytic_steps:
        with jax.default_device(analytic_device):
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
if not model_workdir or not judge_workdir:  # train what is absent, at once (skips the rest)
    api.train_parallel(shared, parallel=0 if small else 3)
model_workdir = model_workdir or f"{root}/cond16"
judge_workdir = judge_workdir or f"{root}/cond16_judge"
run = api.load(model_workdir)
print(run)

# %%
rows = []
ev = {
    "eval.judge_workdir": judge_workdir,
    "eval.num_reference": 2000 if not small else 32,
    "eval.kid_subset_size": min(250, num_samples),
    "eval.kid_num_subsets": 10,
    "eval.floor": False,
}
for sampler in SAMPLERS:
    for k in step_counts:
        row = {"sampler": sampler, "steps": k, "nfe": nfe_of(sampler, k)}
        r = run.evaluate(
            ("fd", "pr"), num_samples, sampler=sampler, steps=k, guidance=0.0, overrides=ev
        )
        row.update({m: r.get(m) for m in ("fd", "class_accuracy", "recall", "sample_seconds")})
        rows.append(row)
model_df = pd.DataFrame(rows)
model_df.round(3)

# %%
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
batch = run.config.sample.batch_size  # the evaluation's batch: its compiled samplers again
api.show(
    np.concatenate(
        [run.sample(batch, sampler=s, steps=step_counts[-1], seed=0)[:8] for s in SAMPLERS]
    ),
    titles=[s for s in SAMPLERS for _ in range(8)],
    ncols=8,
)
