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
# # 02 — The U-Net's "optimizations", one at a time
#
# The course's optimizations lecture as an experiment: a baseline U-Net (ReLU, max-pool
# downsampling, the time as an extra input channel, no attention), then GELU, rearrange
# (space-to-depth) pooling, sinusoidal time embeddings and self-attention **added one at a
# time**, and each **removed one at a time** from the full model. Same data, steps, batch
# and seed for every arm; held-out loss and FD in the clean classifier's features (the
# judge, `configs/classifier.py:clean`) after each of `steps`.
#
# Not ablated, because `models/unet.py` has no switch for them: GroupNorm (always on;
# `model.num_groups` only sets the groups) and residual blocks (always residual).

# %%
import matplotlib.pyplot as plt
import pandas as pd

from diffax_lab import api

# %% tags=["parameters"]
small = False  # True: the CI's seconds-long run (tests/test_notebooks.py injects it)
root = "workdirs/notebooks"  # runs go to ROOT/02_unet_ablation/<arm>
data_dir = ""  # '' = Fashion-MNIST from $DIFFAX_DATA_DIR or the Debian package
judge_workdir = "workdirs/judge16"  # a clean classifier at image_size ('' = loss only)
steps = (100,)  # evaluate each arm after these many training steps (e.g. (100, 200))
base = {  # every arm: configs/ddpm.py:cpu at 16x16 with these fields
    "data.image_size": 16,
    "model.base_channels": 16,
    "train.batch_size": 32,
    "optim.warmup_steps": 50,
    "train.log_every": 25,
    "train.checkpoint_every": 100,
    "train.progress_bar": False,
    "eval.metrics": ("loss", "fd", "kid", "pr"),
    "eval.num_examples": 512,
    "eval.batch_size": 256,
    "eval.num_samples": 256,
    "eval.num_reference": 1000,
    "eval.kid_subset_size": 100,
    "eval.kid_num_subsets": 10,
    "eval.floor": False,
    "sample.sampler": "ddim",
    "sample.num_steps": 20,
    "sample.batch_size": 128,
}

# %%
FULL = {
    "model.activation": "gelu",
    "model.downsample": "rearrange",
    "model.time_embedding": "sinusoidal",
    "model.attention_resolutions": (8,),
}
BASELINE = {
    "model.activation": "relu",
    "model.downsample": "maxpool",
    "model.time_embedding": "channel",
    "model.attention_resolutions": (),
}
NAMES = {
    "model.activation": "GELU",
    "model.downsample": "rearrange pooling",
    "model.time_embedding": "sinusoidal t",
    "model.attention_resolutions": "attention",
}
arms = {"baseline": dict(BASELINE)}
current = dict(BASELINE)
for field, name in NAMES.items():  # added one at a time
    current = {**current, field: FULL[field]}
    arms["+ " + name if field != "model.attention_resolutions" else "full"] = dict(current)
for field, name in NAMES.items():  # removed one at a time from the full model
    if field != "model.attention_resolutions":  # full - attention = "+ sinusoidal t"
        arms["full - " + name] = {**FULL, field: BASELINE[field]}
if small:
    base = {
        **base,
        "data.image_size": 8,
        "model.base_channels": 8,
        "train.batch_size": 8,
        "eval.num_examples": 16,
        "eval.batch_size": 16,
        "sample.batch_size": 4,
    }
    arms = {k: arms[k] for k in ("baseline", "full")}
    FULL["model.attention_resolutions"] = (4,)
    arms["full"]["model.attention_resolutions"] = (4,)
    steps = (2,)  # one training stage: each stage recompiles the step
    judge_workdir = ""  # a judge at 8x8 is not worth its training time here
if data_dir:
    base["data.dir"] = data_dir
if not judge_workdir:
    base["eval.metrics"] = ("loss",)
else:
    base["eval.judge_workdir"] = judge_workdir
cfg = api.config("ddpm:cpu", **base)
pd.DataFrame(arms).transpose()

# %% [markdown]
# ## Train and evaluate every arm (a sweep: one workdir an arm; rerunning skips what is done)

# %%
df = api.sweep(cfg, list(arms.values()), f"{root}/02_unet_ablation", steps=steps)
label = {api_name: arm for arm, api_name in zip(arms, df["point"].unique(), strict=True)}
df["arm"] = df["point"].map(label)
cols = ["test_loss"] + [c for c in ("fd", "kid", "precision", "recall") if c in df]
table = df.pivot_table(index="arm", columns="step", values=cols).reindex(list(arms))
table.round(4)

# %%
fig, axes = plt.subplots(1, 2 if "fd" in df else 1, figsize=(10, 3.5), squeeze=False)
for arm in arms:
    d = df[df["arm"] == arm].sort_values("step")
    style = "o-" if arm in ("baseline", "full") or arm.startswith("+") else "s--"
    axes[0, 0].plot(d["step"], d["test_loss"], style, label=arm)
    if "fd" in df:
        axes[0, 1].plot(d["step"], d["fd"], style, label=arm)
axes[0, 0].set(xlabel="training steps", ylabel="held-out loss (eps MSE)")
if "fd" in df:
    axes[0, 1].set(xlabel="training steps", ylabel="FD (judge features)", yscale="log")
axes[0, -1].legend(fontsize=7)
fig.tight_layout()
plt.show()

# %% [markdown]
# Samples of the baseline and the full model at the last step (same noise):

# %%
for arm in ("baseline", "full"):
    run = api.load(f"{root}/02_unet_ablation/{df[df['arm'] == arm]['point'].iloc[0]}")
    api.show(run.sample(16 if not small else 4, seed=0), title=arm)
