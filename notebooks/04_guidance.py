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
# # 04 — Guidance: the quality-diversity trade-off
#
# Classifier-free guidance weight w (Ho & Salimans: (1 + w) ε(x, y) − w ε(x, ∅)) and
# classifier-guidance scale s (Dhariwal & Nichol, with a noise-conditioned classifier)
# swept on one class-conditional model: class accuracy (does the judge name the class
# asked for?) against FD and recall (how much of the data's variety is covered), one plot.

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from diffax_lab import api

# %% tags=["parameters"]
small = False  # True: the CI's seconds-long run (tests/test_notebooks.py injects it)
root = "workdirs/notebooks"  # the conditional model is ROOT/cond16 (shared with 03)
data_dir = ""  # '' = Fashion-MNIST from $DIFFAX_DATA_DIR or the Debian package
judge_workdir = "workdirs/judge16"  # clean classifier at 16x16 (FD, recall, accuracy)
classifier_workdir = "workdirs/noisy16"  # noise-conditioned classifier ('' = CFG only)
cond_steps = 400  # training steps of ROOT/cond16
cfg_weights = (0.0, 0.5, 1.0, 2.0, 4.0)  # CFG w
classifier_scales = (0.0, 1.0, 3.0, 10.0)  # classifier guidance s (on w = 0)
sampler, steps = "ddim", 20
num_samples = 256

# %%
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
if small:
    over.update(
        {
            "data.image_size": 8,
            "model.base_channels": 8,
            "model.attention_resolutions": (),
            "train.batch_size": 8,
            "train.num_steps": 2,
            "sample.batch_size": 4,
        }
    )
    cfg_weights, classifier_scales, steps, num_samples = (0.0, 2.0), (), 2, 4
    judge_workdir = classifier_workdir = ""
if data_dir:
    over["data.dir"] = data_dir
if classifier_workdir:
    over["sample.classifier_workdir"] = classifier_workdir
run = api.train(api.config("ddpm:cpu", **over), f"{root}/cond16")  # trains, resumes or loads
print(run)

# %% [markdown]
# ## The same noise, one column per class, one row per guidance strength

# %%
classes = list(range(10))
rows = [
    run.sample(10, sampler=sampler, steps=steps, guidance=w, labels=classes) for w in cfg_weights
]
api.show(np.concatenate(rows), titles=[f"w={w:g}" for w in cfg_weights for _ in classes], ncols=10)

# %% [markdown]
# ## Sweep: class accuracy vs FD vs recall

# %%
ev = {
    "eval.judge_workdir": judge_workdir,
    "eval.num_reference": 1000,
    "eval.kid_subset_size": min(100, num_samples),
    "eval.kid_num_subsets": 10,
    "eval.floor": False,
}
settings = [("cfg", w, 0.0) for w in cfg_weights] + [
    ("classifier", 0.0, s) for s in classifier_scales
]
rows = []
for kind, w, s in settings:
    row = {"guidance": kind, "w": w, "s": s}
    if judge_workdir:
        r = run.evaluate(
            ("fd", "pr"),
            num_samples,
            sampler=sampler,
            steps=steps,
            guidance=w,
            classifier_scale=s,
            overrides=ev,
        )
        row.update({m: r[m] for m in ("class_accuracy", "fd", "precision", "recall")})
    else:  # no judge: the samples are drawn, nothing is scored
        row["mean_pixel"] = float(
            run.sample(
                num_samples, sampler=sampler, steps=steps, guidance=w, classifier_scale=s
            ).mean()
        )
    rows.append(row)
guidance_df = pd.DataFrame(rows)
guidance_df.round(3)

# %%
if judge_workdir:
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, d in guidance_df.groupby("guidance"):
        sc = ax.scatter(
            d["fd"],
            d["class_accuracy"],
            c=d["recall"],
            cmap="viridis",
            vmin=0,
            vmax=1,
            marker="o" if kind == "cfg" else "^",
            s=60,
            label=kind,
        )
        ax.plot(d["fd"], d["class_accuracy"], lw=0.7, color="gray")
        for _, r in d.iterrows():
            ax.annotate(
                f"w={r.w:g}" if kind == "cfg" else f"s={r.s:g}",
                (r.fd, r.class_accuracy),
                fontsize=7,
                xytext=(4, 2),
                textcoords="offset points",
            )
    fig.colorbar(sc, label="recall (judge features)")
    ax.set(xlabel="FD (judge features)", ylabel="class accuracy (judge)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    plt.show()
