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
# # 05 — Text to image through CLIP
#
# A CLIP trained here on Fashion-MNIST with captions (`configs/clip.py`), a U-Net
# conditioned on its image embeddings (`configs/text2img.py`), sampled from the **text**
# embeddings of prompts with classifier-free guidance. Shown: how the prompts' embeddings
# relate, samples per prompt, and the CLIP score of samples against their own prompts
# versus shuffled prompts (a score that does not drop when shuffled says nothing).
#
# Self-contained: both runs are trained into ROOT when absent. Planned on an H200 shared
# with 7 other notebooks, compile included: CLIP ~50 s (1500 steps, batch 128); the
# text-to-image U-Net ~110 s (CLIP embeddings of the training images, ~30 s of compile,
# 2000 steps at batch 128); prompts and samples ~20 s (one sampler program); CLIP scores
# at 4 guidance weights, 200 samples each, ~30 s: ~3.5 minutes.

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from diffax_lab import api

# %% tags=["parameters"]
small = False  # True: the CI's seconds-long run (tests/test_notebooks.py injects it)
root = "workdirs/notebooks"  # CLIP in ROOT/clip, the text-to-image model in ROOT/t2i
data_dir = ""  # '' = Fashion-MNIST from $DIFFAX_DATA_DIR or the Debian package
clip_steps = 1500  # configs/clip.py's default
t2i_steps = 2000  # configs/text2img.py's default (the U-Net of configs/ddpm.py:cpu)
t2i_batch = 128  # configs/text2img.py's is 32 (sized for a CPU)
prompts = (
    "a photo of a t-shirt",
    "a photo of a trouser",
    "a photo of a sneaker",
    "a photo of a bag",
)
guidance_weights = (0.0, 1.0, 2.0, 4.0)
sampler, steps = "ddim", 50
num_samples = 200  # per guidance weight, for the CLIP scores

# %%
clip_over = {"train.num_steps": clip_steps, "train.progress_bar": False}
t2i_over = {
    "train.num_steps": t2i_steps,
    "train.batch_size": t2i_batch,
    "train.checkpoint_every": 1000,
    "train.progress_bar": False,
}
variant = ""
if small:
    variant = ":tiny"
    clip_over, t2i_over = {"train.num_steps": 2}, {"train.num_steps": 2, "model.base_channels": 8}
    prompts, guidance_weights, steps, num_samples = prompts[:2], (0.0, 2.0), 2, 4
if data_dir:
    clip_over["data.dir"] = t2i_over["data.dir"] = data_dir
clip_run = api.train(api.config("clip" + variant, **clip_over), f"{root}/clip")
t2i_over["text.clip_dir"] = f"{root}/clip/hf_clip"
run = api.train(api.config("text2img" + variant, **t2i_over), f"{root}/t2i")
print(clip_run, run)

# %% [markdown]
# ## The prompts in CLIP's text space (cosine similarity)

# %%
emb = run.task.encoder.embed_texts(list(prompts))
unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
fig, ax = plt.subplots(figsize=(4.5, 3.5))
im = ax.imshow(unit @ unit.T, vmin=-1, vmax=1, cmap="coolwarm")
ax.set_xticks(range(len(prompts)), [p.split()[-1] for p in prompts], rotation=45)
ax.set_yticks(range(len(prompts)), [p.split()[-1] for p in prompts])
fig.colorbar(im)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Samples: one row per prompt (the same noise), at each guidance weight

# %%
per = 6
labels = np.repeat(emb, per, axis=0)
n = max(len(labels), run.config.sample.batch_size)  # the evaluation's batch: one program
for w in guidance_weights:
    x = run.sample(n, sampler=sampler, steps=steps, guidance=w, labels=labels, seed=0)
    x = x[: len(labels)]
    api.show(
        x, titles=[p.split()[-1] for p in prompts for _ in range(per)], ncols=per, title=f"w={w:g}"
    )

# %% [markdown]
# ## CLIP score against the prompt asked vs shuffled prompts (class prompts in turn)

# %%
rows = []
for w in guidance_weights:
    r = run.evaluate(("clip_score",), num_samples, sampler=sampler, steps=steps, guidance=w)
    rows.append({"w": w, **{k: r[k] for k in r if k.startswith(("clip", "real_clip"))}})
scores = pd.DataFrame(rows)
scores.round(3)

# %%
fig, ax = plt.subplots(figsize=(5.5, 3.5))
ax.errorbar(
    scores["w"], scores["clip_score"], scores["clip_score_sem"], fmt="o-", label="own prompt"
)
ax.errorbar(
    scores["w"],
    scores["clip_score_shuffled"],
    scores["clip_score_shuffled_sem"],
    fmt="s--",
    label="shuffled prompt",
)
ax.axhline(scores["real_clip_score"].iloc[0], color="gray", lw=0.8, label="real images, own")
ax.set(xlabel="CFG weight w", ylabel="CLIP score")
ax.legend(fontsize=7)
fig.tight_layout()
plt.show()
