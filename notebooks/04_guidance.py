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
#
# Self-contained: the class-conditional model (ROOT/cond16), the judge (ROOT/cond16_judge)
# and the noise-conditioned classifier (ROOT/cond16_noisy) are 03's runs; any that is absent
# is trained here first (the same recipe, in the same cell as 03's). Planned on an H200
# shared with 7 other notebooks, after 03: loading ~15 s; the grid of samples ~10 s (one
# sampler compile); 5 CFG weights + 4 classifier scales, 500 samples each, ~60 s (two
# sampler programs: CFG and classifier-guided): ~1.5 minutes.

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from diffax_lab import api

# %% tags=["parameters"]
small = False  # True: the CI's seconds-long run (tests/test_notebooks.py injects it)
root = "workdirs/notebooks"  # ROOT/cond16, ROOT/cond16_judge, ROOT/cond16_noisy (from 03)
data_dir = ""  # '' = Fashion-MNIST from $DIFFAX_DATA_DIR or the Debian package
cond_steps = 1500  # training steps of ROOT/cond16 (batch 128), as in 03
cfg_weights = (0.0, 0.5, 1.0, 2.0, 4.0)  # CFG w
classifier_scales = (1.0, 3.0, 10.0, 30.0)  # classifier guidance s (on w = 0; s = 0 is w = 0)
sampler, steps = "ddim", 20
num_samples = 500

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
    cfg_weights, classifier_scales, steps, num_samples = (0.0, 2.0), (1.0,), 2, 8
api.train_parallel(shared, parallel=0 if small else 3)  # after 03: all there, nothing to do
judge_workdir = f"{root}/cond16_judge"
run = api.load(f"{root}/cond16", {"sample.classifier_workdir": f"{root}/cond16_noisy"})
print(run)

# %% [markdown]
# ## The same noise, one column per class, one row per guidance strength

# %%
classes = list(range(10))
batch = run.config.sample.batch_size  # the evaluation's batch: its compiled sampler again
rows = [
    run.sample(batch, sampler=sampler, steps=steps, guidance=w, labels=classes)[:10]
    for w in cfg_weights
]
api.show(np.concatenate(rows), titles=[f"w={w:g}" for w in cfg_weights for _ in classes], ncols=10)

# %% [markdown]
# ## Sweep: class accuracy vs FD vs recall

# %%
ev = {
    "eval.judge_workdir": judge_workdir,
    "eval.num_reference": 2000 if not small else 32,
    "eval.kid_subset_size": min(250, num_samples),
    "eval.kid_num_subsets": 10,
    "eval.floor": False,
}
settings = [("cfg", w, 0.0) for w in cfg_weights] + [
    ("classifier", 0.0, s) for s in classifier_scales
]
rows = []
for kind, w, s in settings:
    row = {"guidance": kind, "w": w, "s": s}
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
    rows.append(row)
guidance_df = pd.DataFrame(rows)
guidance_df.round(3)

# %%
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
