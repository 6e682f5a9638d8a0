# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 06 Latent diffusion
#
# Stable Diffusion is diffusion in the latent space of an autoencoder. This notebook trains
# the lab's KL autoencoder (`configs/vae.py`, diffusers' `AutoencoderKL` in Flax) on
# Fashion-MNIST padded to 32x32 (latents 8x8x4, f = 4), looks at its reconstructions and
# its latent space, trains a class-conditional U-Net on the latents (`configs/ldm.py`) and
# compares it with the same U-Net trained on pixels (`configs/cfg.py`) for the same number
# of steps: samples, training and sampling speed, and (with a judge) FD.
#
# The defaults below are the full-size runs (hours on a CPU); CI runs the notebook with
# small parameters.

# %% tags=["parameters"]
small = False  # True: the CI's seconds-long run (tiny configs, a few steps)
root = "workdirs/nb06"
vae_config = "vae"  # "vae:cpu" or "vae:tiny" for smaller runs
ldm_config = "ldm"
pixel_config = "cfg"
vae_steps = 20_000
diffusion_steps = 20_000
judge_workdir = ""  # a clean classifier of 32x32 images (configs/classifier.py:clean) for FD
num_eval_samples = 1000
sample_steps = 50

# %%
import os  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from diffax_lab import api  # noqa: E402

if small:
    vae_config, ldm_config, pixel_config = "vae:tiny", "ldm:tiny", "cfg:tiny"
    vae_steps = diffusion_steps = 2
    num_eval_samples, sample_steps = 8, 4
os.makedirs(root, exist_ok=True)

# %% [markdown]
# ## 1. The autoencoder
# Summed L1 error + 1e-6 x KL(q(z|x) || N(0, I)), LDM's objective without LPIPS and the
# discriminator (`autoencoder.discriminator=True` adds LDM's patch-GAN).

# %%
judge = {"eval.judge_workdir": judge_workdir} if judge_workdir else {}
vae_cfg = api.config(vae_config, **{"train.num_steps": vae_steps, **judge})
vae = api.train(vae_cfg, f"{root}/vae")
print(vae.metrics.tail())

# %%
metrics = ("loss", "reconstruction") + (("fd",) if judge_workdir else ())
vae_report = api.load(f"{root}/vae").evaluate(metrics=metrics, num_samples=num_eval_samples)
print({k: v for k, v in vae_report.items() if isinstance(v, float)})

# %% [markdown]
# Reconstructions: rows alternate real test images and the decoded posterior means
# (`--mode=sample` writes the same grid to `samples/reconstructions_step_N.png`).

# %%
vae_run = api.load(f"{root}/vae")
real = vae_run.task.real_images(16)
api.show(np.concatenate([real, vae_run.task.reconstructions(vae_run.params, real)]))

# %% [markdown]
# ## 2. The latent space
# Decoding z ~ N(0, I) (the VAE as a generative model) is poor by design with kl_weight
# 1e-6: the posterior is barely pulled towards N(0, I). The latent diffusion model learns
# the distribution of the latents instead.

# %%
prior = vae_run.sample(16, seed=0)
api.show(prior)

# %% [markdown]
# ## 3. Latent vs pixel diffusion, same number of steps

# %%
runs, speed = {}, {}
for name, spec, extra in (
    ("latent", ldm_config, {"latent.autoencoder": f"{root}/vae"}),
    ("pixel", pixel_config, {"data.image_size": 32}),
):
    cfg = api.config(spec, **{"train.num_steps": diffusion_steps, **extra, **judge})
    t0 = time.time()
    api.train(cfg, f"{root}/{name}")
    train_s = time.time() - t0
    run = api.load(f"{root}/{name}")
    t0 = time.time()
    x = run.sample(64, sampler="ddim", steps=sample_steps, guidance=1.0, seed=0)
    sample_s = time.time() - t0
    runs[name] = run
    speed[name] = {
        "train images/s": diffusion_steps * cfg.train.batch_size / train_s,
        "sample images/s (ddim, incl. compile)": 64 / sample_s,
    }
    api.show(x)
print(speed)

# %%
if judge_workdir:
    table = {
        name: run.evaluate(metrics=("fd",), num_samples=num_eval_samples)
        for name, run in runs.items()
    }
    print(table)
