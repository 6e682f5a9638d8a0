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
# # 01 — The forward process: linear, cosine and sigmoid schedules
#
# ᾱ(t) and log-SNR of the three schedules of `diffusion/schedules.py`, one test image noised
# along each, and the course's question: **how many sampling steps are enough?** — answered
# on a target whose optimal denoiser is known in closed form (a Gaussian mixture,
# `diffusion/analytic.py`), so the error is the sampler's and the schedule's alone.

# %%
import jax
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from diffax_lab import api
from diffax_lab.data import load_split
from diffax_lab.diffusion import analytic, process, samplers
from diffax_lab.diffusion.schedules import get_schedule

# %% tags=["parameters"]
small = False  # True: the CI's seconds-long run (tests/test_notebooks.py injects it)
root = "workdirs/notebooks"  # where runs are written (unused here: nothing is trained)
data_dir = ""  # '' = Fashion-MNIST from $DIFFAX_DATA_DIR or the Debian package
num_timesteps = 1000  # T
step_counts = (5, 10, 20, 50, 100, 250, 1000)  # sampling steps tried
num_samples = 4000  # samples per (schedule, sampler, steps) from the analytic target
dim = 16  # dimension of the analytic mixture

# %%
if small:
    num_timesteps, step_counts, num_samples, dim = 100, (4,), 64, 4

# %%
SCHEDULES = ("linear", "cosine", "sigmoid")
scheds = {name: get_schedule(name, num_timesteps) for name in SCHEDULES}

# %% [markdown]
# ## ᾱ(t) and log-SNR

# %%
fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3))
for name, s in scheds.items():
    t, ab = np.asarray(s.times), np.asarray(s.alphas_cumprod)
    a1.plot(t, ab, label=name)
    a2.plot(t, np.log(ab / (1 - ab)), label=name)
a1.set(xlabel="t", ylabel="ᾱ(t)", title="signal kept")
a2.set(xlabel="t", ylabel="log SNR = log ᾱ/(1-ᾱ)", title="log-SNR")
a1.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## One image noised along each schedule (the same noise in every row)

# %%
cfg = api.config("ddpm", **({"data.dir": data_dir} if data_dir else {}))
image = load_split(cfg.data, "test")[0][0]
frames = 8
idx = np.round(np.linspace(0, num_timesteps - 1, frames)).astype(int)
noise = jax.random.normal(jax.random.PRNGKey(0), (frames, *image.shape))
x0 = np.broadcast_to(image / 127.5 - 1, (frames, *image.shape))
rows, titles = [], []
for name, s in scheds.items():
    xt = process.q_sample(x0, s.alphas_cumprod[idx], noise)
    rows.append(np.clip((np.asarray(xt) + 1) * 127.5, 0, 255).astype(np.uint8))
    titles += [f"{name} t={float(s.times[i]):.2f}" for i in idx]
api.show(np.concatenate(rows), titles=titles, ncols=frames, size=1.1)

# %% [markdown]
# ## How many steps are enough?
#
# Data: a mixture of two Gaussians in `dim` dimensions (means ±0.5, std 0.1) — bimodal
# like pixels. Its exact noise predictor stands in for a perfect network. The error is the
# sliced Wasserstein-1 distance between the samples and fresh draws from the mixture (50
# random directions); its floor at this sample size is the last column.

# %%
means = np.stack([np.full(dim, 0.5), np.full(dim, -0.5)]).astype(np.float32)
stds, weights = np.array([0.1, 0.1], np.float32), np.array([0.5, 0.5], np.float32)
rng = np.random.default_rng(0)


def draw_target(n):
    k = rng.choice(2, n, p=weights)
    return means[k] + stds[k, None] * rng.standard_normal((n, dim))


directions = rng.standard_normal((50, dim))
directions /= np.linalg.norm(directions, axis=1, keepdims=True)


def sliced_w1(a, b):
    pa, pb = np.sort(a @ directions.T, axis=0), np.sort(b @ directions.T, axis=0)
    return float(np.mean(np.abs(pa - pb)))


def draw(schedule, key, sampler, k):
    """num_samples draws of the sampler with the exact noise predictor of the mixture."""
    model_fn = analytic.gaussian_mixture_model_fn(schedule, means, stds, weights)
    run = jax.jit(
        lambda key: (
            samplers.sample(
                model_fn,
                schedule,
                (num_samples, dim),
                key,
                sampler=sampler,
                num_steps=k,
                clip_x0=None,
            ).samples
        )
    )
    return np.asarray(run(key))


rows = []
for name, s in scheds.items():
    for sampler in ("ddpm", "ddim"):
        for k in step_counts:
            out = draw(s, jax.random.PRNGKey(1), sampler, k)
            w1 = sliced_w1(out, draw_target(num_samples))
            rows.append({"schedule": name, "sampler": sampler, "steps": k, "sliced_w1": w1})
floor = np.mean([sliced_w1(draw_target(num_samples), draw_target(num_samples)) for _ in range(3)])
steps_table = pd.DataFrame(rows).pivot_table(
    index=["schedule", "sampler"], columns="steps", values="sliced_w1"
)
steps_table["floor"] = floor
steps_table.round(4)

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
for (name, sampler), row in steps_table.drop(columns="floor").iterrows():
    ax.plot(row.index, row.values, "o-" if sampler == "ddim" else "s--", label=f"{name} {sampler}")
ax.axhline(floor, color="gray", lw=0.8, label="sampling floor")
ax.set(xscale="log", yscale="log", xlabel="sampling steps", ylabel="sliced W1 to the target")
ax.legend(fontsize=7)
fig.tight_layout()
plt.show()
