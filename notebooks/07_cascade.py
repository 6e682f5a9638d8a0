# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---
# ruff: noqa: E402, B018

# %% [markdown]
# # 07 · Cascades: super-resolution diffusion, its regression baseline, and the unCLIP prior
#
# Fashion-MNIST 14×14 → 28×28. We train a regression upsampler (SRResNet, L1) and a
# super-resolution diffusion model with Gaussian conditioning augmentation, compare them by
# PSNR/SSIM against the real images and by FD/accuracy in a clean classifier's feature
# space, sweep the augmentation level s used at sampling, and chain a 14×14 base model
# with the upsampler (`configs/cascade.py`). The last section compares text → prior →
# decoder with text → decoder by CLIP score (needs a CLIP and a text2img run).
# Defaults are the full-size runs of docs/BENCHMARKS.md "Cascades"; CI runs it small.

# %% tags=["parameters"]
root = "workdirs/nb07"
steps = 800  # training steps of each model
judge_steps = 600
num_samples = 500  # eval.num_samples
aug_levels = (0.0, 0.05, 0.1, 0.2, 0.3)
sample_steps = 25
clip_dir = ""  # a CLIP in Hugging Face layout (configs/clip.py writes workdirs/clip/hf_clip)
t2i_workdir = ""  # a text2img run conditioned on that CLIP (configs/text2img.py)
small = False  # CI: tiny sizes

# %%
import os

import pandas as pd

from diffax_lab import api

variant = "tiny" if small else "cpu"
judge = api.train(
    api.config(
        "classifier:cpu,clean" if not small else "classifier:tiny,clean",
        **{"train.num_steps": judge_steps, "data.image_size": 16 if small else 28},
    ),
    os.path.join(root, "judge"),
)
ev = {"eval.judge_workdir": os.path.join(root, "judge"), "eval.floor": False}
up = api.train(
    api.config(f"upsampler:{variant}", **{"train.num_steps": steps, **ev}),
    os.path.join(root, "up"),
)
sr = api.train(
    api.config(f"superres:{variant}", **{"train.num_steps": steps, **ev}),
    os.path.join(root, "sr"),
)
up.metrics.tail()

# %% [markdown]
# ## Regression vs diffusion, and the augmentation level at sampling

# %%
rows = [
    {
        "model": "SRResNet (L1)",
        **up.evaluate(metrics=("psnr", "ssim", "fd"), num_samples=num_samples),
    }
]
for s in aug_levels:
    run = api.train(
        api.config(
            f"superres:{variant}",
            **{
                "train.num_steps": steps,
                "sample.aug_level": s,
                "sample.num_steps": sample_steps,
                **ev,
            },
        ),
        os.path.join(root, "sr"),
    )  # already trained: loads it with this sampling setting
    rows.append(
        {
            "model": f"diffusion, s={s:g}",
            **run.evaluate(metrics=("psnr", "ssim", "fd"), num_samples=num_samples),
        }
    )
table = pd.DataFrame(rows)[["model", "psnr", "ssim", "fd", "class_accuracy"]]
table

# %% [markdown]
# Diffusion trades PSNR (a regression to the mean maximises it) for realism (FD); a small
# s helps when the low-resolution input is itself a sample (next cell).

# %%
from diffax_lab import config_lib
from diffax_lab.modes import sample as sample_mode

base = api.train(
    api.config(
        f"ddpm:{variant}", **{"train.num_steps": steps, "data.image_size": 8 if small else 14}
    ),
    os.path.join(root, "base14"),
)
cascade = config_lib.load_config("cascade.py" + (":tiny" if small else ""))
cascade.cascade.base_workdir = os.path.join(root, "base14")
cascade.cascade.upsampler_workdirs = (os.path.join(root, "sr"),)
cascade.cascade.aug_levels = (0.1,)
out = sample_mode.run(cascade, os.path.join(root, "cascade"))
api.show(out["stages"][-1])
out["stage_seconds"]

# %% [markdown]
# ## Prior vs no prior (unCLIP)
# With `clip_dir` and `t2i_workdir` set: a prior (configs/prior.py) maps the prompt's CLIP
# text embedding to an image embedding for the decoder; compare the CLIP scores of
# `--mode=eval` runs of `configs/cascade.py:unclip` with and without `cascade.prior_workdir`.

# %%
if clip_dir and t2i_workdir:
    prior = api.train(
        api.config("prior", **{"text.clip_dir": clip_dir, "train.num_steps": 5 * steps}),
        os.path.join(root, "prior"),
    )
    unclip = config_lib.load_config("cascade.py:unclip")
    unclip.cascade.base_workdir = t2i_workdir
    unclip.cascade.prior_workdir = os.path.join(root, "prior")
    with_prior = sample_mode.run(unclip, os.path.join(root, "unclip"))
    api.show(with_prior["samples"])
