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
# The course's optimizations lecture as an experiment. The baseline U-Net has none of them:
# no normalisation (`model.norm="none"`), ReLU, max-pool downsampling, the time as an extra
# input channel, plain two-conv blocks without the skip path (`model.residual=False`) and no
# attention. Then GroupNorm, GELU, rearrange (space-to-depth) pooling, sinusoidal time
# embeddings, residual blocks and self-attention are **added one at a time** (cumulatively:
# the last is the full model), and each is **removed one at a time** from the full model
# ("full − attention" is the same network as "+ residual blocks", so it is trained once).
# Same data, steps, batch, learning rate and seed for every arm; held-out loss (ε-MSE on
# test images) and FD / KID / precision / recall in the features of a clean classifier (the
# judge, `configs/classifier.py:cpu,clean`, trained here at the same image size) after each
# of `steps`.
#
# Full size (the defaults), sized for a 2-core CPU: Fashion-MNIST at 16x16, a two-level
# U-Net (base 32 channels), batch 64, lr 1e-3, EMA 0.98, 600 steps, evaluated at 200 and
# 600 steps with 500 DDIM-20 samples; the 12 arms one after another in this process
# (`parallel=0`). About an hour on the 2-core CPU machine (the render's time: README).
# On a GPU, train the arms at once in worker processes and longer, e.g. papermill
# `-p parallel 4 -p batch_size 128 -p steps "(400, 1200)"`.

# %%
import os

import matplotlib.pyplot as plt
import pandas as pd

from diffax_lab import api

# %% tags=["parameters"]
small = False  # True: the CI's seconds-long run (tests/test_notebooks.py injects it)
root = "workdirs/notebooks"  # runs go to ROOT/02_unet_ablation/<arm>, the judge to ROOT/judge16
data_dir = ""  # '' = Fashion-MNIST from $DIFFAX_DATA_DIR or the Debian package
judge_workdir = ""  # a clean classifier at image_size; '' = train ROOT/judge16 if absent
judge_steps = 1000  # training steps of that judge (batch 128)
steps = (200, 600)  # evaluate each arm after these many training steps
batch_size = 64  # of every arm
parallel = 0  # arms trained at once, each in its own process (0: one by one, in-process);
# on a GPU 4 overlap one arm's compile with another's steps; 20-25 at once made each step
# seconds there (BENCHMARKS.md). On 2 CPU cores one process already uses both.
base = {  # every arm: configs/ddpm.py:cpu (two levels, one block each) with these fields
    "data.image_size": 16,
    "model.base_channels": 32,
    "model.num_groups": 8,
    "model.attention_heads": 4,
    "train.batch_size": batch_size,
    "optim.lr": 1e-3,
    "optim.warmup_steps": 100,
    # An EMA for a short run: 0.98^200 < 2% of the initial weights left at the first
    # evaluation (ddpm.py:cpu's 0.995 leaves 37%, and every arm's samples are noise there).
    "optim.ema_decay": 0.98,
    "train.log_every": 50,
    "train.checkpoint_every": 200,
    "train.checkpoint_every_secs": 0,
    "train.progress_bar": False,
    "eval.metrics": ("loss", "fd", "kid", "pr"),
    "eval.num_examples": 2000,  # held-out images for the loss
    "eval.batch_size": 500,
    "eval.num_samples": 500,
    "eval.num_reference": 2000,
    "eval.kid_subset_size": 250,
    "eval.kid_num_subsets": 10,
    "eval.floor": False,
    "sample.sampler": "ddim",
    "sample.num_steps": 20,
    "sample.batch_size": 500,
}

# %%
# (field, value in the full model, value in the baseline) per optimization, in the order
# they are added. Attention is two fields: blocks at the 8x8 level and the middle one.
FEATURES = {
    "GroupNorm": {"model.norm": ("group", "none")},
    "GELU": {"model.activation": ("gelu", "relu")},
    "rearrange pooling": {"model.downsample": ("rearrange", "maxpool")},
    "sinusoidal t": {"model.time_embedding": ("sinusoidal", "channel")},
    "residual blocks": {"model.residual": (True, False)},
    "attention": {"model.attention_resolutions": ((8,), ()), "model.mid_attention": (True, False)},
}
if small:
    FEATURES["attention"]["model.attention_resolutions"] = ((4,), ())


def arm(with_features):
    """The overrides of the arm that has exactly ``with_features``."""
    return {
        field: full if name in with_features else baseline
        for name, fields in FEATURES.items()
        for field, (full, baseline) in fields.items()
    }


names = list(FEATURES)
arms = {"baseline": arm(())}
for i, name in enumerate(names):  # added one at a time, cumulatively
    label = "full" if i == len(names) - 1 else f"+ {name}"
    if i == len(names) - 2:
        label += " (= full − attention)"
    arms[label] = arm(names[: i + 1])
for name in names[:-1]:  # removed one at a time from the full model
    arms[f"full − {name}"] = arm([n for n in names if n != name])

if small:
    base = {
        **base,
        "data.image_size": 8,
        "model.base_channels": 8,
        "model.num_groups": 4,
        "model.attention_heads": 1,
        "train.batch_size": 8,
        "eval.num_examples": 16,
        "eval.batch_size": 16,
        "eval.num_samples": 8,
        "eval.num_reference": 32,
        "eval.kid_subset_size": 4,
        "eval.kid_num_subsets": 2,
        "sample.num_steps": 2,
        "sample.batch_size": 8,
    }
    arms = {k: arms[k] for k in ("baseline", "full")}
    steps, judge_steps, parallel = (2,), 2, 0  # in-process: no worker start-up on 2 cores
if data_dir:
    base["data.dir"] = data_dir
pd.DataFrame(arms).transpose()

# %% [markdown]
# ## The judge: a clean classifier at the arms' image size (trained once, in its own process)

# %%
if not judge_workdir:
    judge_over = {
        "data.image_size": base["data.image_size"],
        "train.batch_size": 128 if not small else 8,
        "train.num_steps": judge_steps,
        "train.checkpoint_every": judge_steps,
        "train.progress_bar": False,
    }
    if small:
        judge_over.update({"eval.num_examples": 32, "eval.batch_size": 16})
    if data_dir:
        judge_over["data.dir"] = data_dir
    judge_cfg = api.config("classifier:cpu,clean" if not small else "classifier:tiny,clean")
    judge_cfg = api.config(judge_cfg, **judge_over)
    judge_df = api.sweep(judge_cfg, [{}], f"{root}/judge16", parallel=min(parallel, 1))
    judge_workdir = f"{root}/judge16/base"
    print(judge_df.filter(like="accuracy").round(3).to_string())
base["eval.judge_workdir"] = os.path.abspath(judge_workdir)
cfg = api.config("ddpm:cpu", **base)

# %% [markdown]
# ## Every arm to the first step count (a sweep: one workdir an arm; reruns skip what is done)

# %%
points = list({api.sweep_point_name(cfg, p): p for p in arms.values()}.values())  # distinct
label_of = {}  # directory -> the arm's label (the first, where two arms are one network)
for label, p in arms.items():
    label_of.setdefault(api.sweep_point_name(cfg, p), label)
cols = ["test_loss", "fd", "kid", "precision", "recall"]


def results(steps_now):
    df = api.sweep(
        cfg, points, f"{root}/02_unet_ablation", steps=steps_now, parallel=parallel, keep_going=True
    )
    df["arm"] = df["point"].map(label_of)
    present = [c for c in cols if c in df]
    table = df.pivot_table(index="arm", columns="step", values=present)
    return df, table.reindex([a for a in label_of.values() if a in table.index])


df, table = results(steps[:1])
table.round(4)

# %% [markdown]
# ## ... then to the last (resumed from the checkpoints above)

# %%
df, table = results(steps)
table.round(4)

# %%
metrics = [c for c in ("test_loss", "fd", "recall") if c in df]
fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.8), squeeze=False)
for label in label_of.values():
    d = df[df["arm"] == label].sort_values("step")
    style = "o-" if not label.startswith("full −") else "s--"
    for ax, m in zip(axes[0], metrics, strict=True):
        ax.plot(d["step"], d[m], style, label=label)
ylabels = {"test_loss": "held-out loss (ε MSE)", "fd": "FD (judge features)", "recall": "recall"}
for ax, m in zip(axes[0], metrics, strict=True):
    ax.set(xlabel="training steps", ylabel=ylabels[m], yscale="log" if m != "recall" else "linear")
axes[0, -1].legend(fontsize=6, loc="best")
fig.tight_layout()
plt.show()

# %% [markdown]
# Training loss (logged every `train.log_every` steps) of every arm:

# %%
fig, ax = plt.subplots(figsize=(6.5, 3.8))
for name, label in label_of.items():
    m = api.metrics_frame(f"{root}/02_unet_ablation/{name}")
    if "loss" in m:
        ax.plot(m["step"], m["loss"], "-" if not label.startswith("full −") else "--", label=label)
ax.set(xlabel="training steps", ylabel="training loss", yscale="log")
ax.legend(fontsize=6)
fig.tight_layout()
plt.show()

# %% [markdown]
# Samples of the baseline and the full model at the last step (same noise):

# %%
for label in ("baseline", "full"):
    name = next(n for n, a in label_of.items() if a == label)
    run = api.load(f"{root}/02_unet_ablation/{name}")
    api.show(run.sample(16 if not small else 4, seed=0), title=f"{label} (step {run.step})")
