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
# ruff: noqa: E402

# %% [markdown]
# # 06 Latent diffusion
#
# Stable Diffusion is diffusion in the latent space of an autoencoder. This notebook trains
# the lab's KL autoencoder (`configs/vae.py`, diffusers' `AutoencoderKL` in Flax) on
# Fashion-MNIST padded to 32x32 (latents 8x8x4, f = 4) and measures it (test PSNR, rate,
# FD of reconstructions and of prior samples); then a class-conditional U-Net on its latents
# (`configs/ldm.py`) against one on pixels (`configs/cfg.py`) trained for the **same
# wall-clock time** on the same machine (FD and judge accuracy of class-conditional
# samples, training and sampling images/s); then a text-to-image latent model that
# cross-attends to the CLIP's tokens (`configs/ldm_text2img.py`) against the
# pooled-embedding pixel model (`configs/text2img.py`) by CLIP score against own vs
# shuffled prompts. Everything it needs (the judge, the CLIP) is trained into `root` when
# absent; a rerun on the same `root` trains nothing again.
#
# The defaults are sized for a 2-core CPU: the configs' `:cpu` variants, a few minutes of
# training each (about an hour in all; the render's time is in docs/BENCHMARKS.md). The
# GPU run uses the configs' full size for the same wall-clock (about five minutes on one
# H200 shared with other jobs, compiles included): papermill `-p models '' -p vae_steps 1000
# -p judge_steps 800 -p train_seconds 20 -p clip_steps 400 -p t2i_seconds 12 -p t2i_batch
# 128`. CI runs the notebook with `small=True` (tiny configs, a few steps, seconds).

# %% tags=["parameters"]
small = False  # True: the CI's seconds-long run (tests/test_notebooks.py injects it)
root = "workdirs/nb06"  # every run of the notebook lives under ROOT
data_dir = ""  # '' = Fashion-MNIST from $DIFFAX_DATA_DIR or the Debian package
vae_steps = 1500  # autoencoder training steps (configs/vae.py)
judge_steps = 600  # the clean classifier (configs/classifier.py:cpu,clean at 32x32)
train_seconds = 360.0  # latent vs pixel: wall-clock training time of EACH (compile excluded)
calibration_steps = 100  # steps that measure a model's speed before its length is set
clip_steps = 600  # configs/clip.py (the CLIP both text models condition on)
t2i_seconds = 240.0  # training time of each text-to-image model
t2i_batch = 64  # their training batch
# Every model here trains for a few hundred to a few thousand steps: a short warm-up, and an
# EMA that forgets the initial weights within the run (0.99^500 < 1%; the configs' 0.999
# would keep 37% of them after 1000 steps).
short_run = {"optim.warmup_steps": 100, "optim.ema_decay": 0.99}
sampler, sample_steps, guidance = "ddim", 50, 1.0  # the same for latent and pixel samples
sample_batch = 500  # images per sampler call (one compiled sampler per model)
diffusion_lr = 5e-4  # the latent, pixel and token-conditioned U-Nets (short runs)
num_res_blocks = 1  # of those U-Nets (their configs have 2): less to compile, faster steps
num_eval_samples = 1000  # samples per FD / judge accuracy (against 10,000 test images)
num_clip_samples = 500  # samples per text model for the CLIP scores (10 prompts in turn)
models = "cpu"  # config variants: 'cpu' (2 cores), '' (full size, GPU), 'tiny' (quick check)

# %%
import os
import time

import jax
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from diffax_lab import api
from diffax_lab.data import load_split
from diffax_lab.evaluators.clip_score import clip_report
from diffax_lab.evaluators.sample_quality import compare_features
from diffax_lab.metrics.features import reference_features
from diffax_lab.tasks import registry

if small:
    models = "tiny"
variant = f":{models}" if models else ""
# configs/clip.py and configs/text2img.py have no :cpu variant: their full size is the CPU's
text_variant = ":tiny" if models == "tiny" else ""
if small:
    vae_steps = judge_steps = clip_steps = calibration_steps = 2
    train_seconds = t2i_seconds = 0.0  # = the calibration steps only
    sample_steps, sample_batch = 4, 10
    num_eval_samples = num_clip_samples = 8
data = {"data.dir": data_dir} if data_dir else {}
os.makedirs(root, exist_ok=True)
timings = {}  # stage -> wall seconds in this process (compiles included)


def timed(stage, t0):
    timings[stage] = time.time() - t0
    print(f"[{stage}: {timings[stage]:.1f} s]")


def by_class(x, num_classes=10, per=8):
    """Samples drawn for classes 0, 1, ... in turn -> rows of one class."""
    return np.concatenate([x[k::num_classes][:per] for k in range(num_classes)])


def trained_seconds(run):
    """(steps, seconds of training, images/s) as the train loop measured them: each line of
    metrics.jsonl has images_per_sec over its interval (compiles, checkpoints and samples
    excluded); intervals without it count at the mean speed."""
    m = run.metrics
    if "images_per_sec" not in m:
        return int(run.step), float("nan"), float("nan")
    steps = m["step"].diff().fillna(m["step"].iloc[0]).to_numpy()
    ips = m["images_per_sec"].to_numpy()
    timed_rows = np.isfinite(ips)
    images = steps[timed_rows] * run.config.train.batch_size
    speed = images.sum() / (images / ips[timed_rows]).sum()
    return int(run.step), run.step * run.config.train.batch_size / speed, float(speed)


def train_for(cfg, workdir, seconds):
    """Trains ``cfg`` for about ``seconds`` of wall-clock training: ``calibration_steps``
    first, whose measured speed sets the total step count; then resumes to it."""
    first = api.config(cfg, **{"train.num_steps": calibration_steps})
    run = api.train(first, workdir)
    if run.step > calibration_steps:  # trained by an earlier run of the notebook
        return run
    speed = trained_seconds(run)[2] / cfg.train.batch_size  # steps/s
    total = max(calibration_steps, int(seconds * speed) if np.isfinite(speed) else 0)
    return api.train(api.config(cfg, **{"train.num_steps": total}), workdir)


# %% [markdown]
# ## 1. The autoencoder
# Summed L1 error + 1e-6 x KL(q(z|x) || N(0, I)), LDM's objective without LPIPS and the
# discriminator (`autoencoder.discriminator=True` adds LDM's patch-GAN). Test PSNR and the
# rate (KL in bits per pixel, the cost of the code under the prior) on the 10,000 test
# images.

# %%
t0 = time.time()
vae_over = {**data, **short_run, "train.num_steps": vae_steps, "train.sample_every": 0}
if not small:  # whole batches of 250: one compiled program per function
    vae_over.update({"eval.num_examples": 10_000, "eval.batch_size": 250})
    vae_over["sample.batch_size"] = 250
vae = api.train(api.config("vae" + variant, **vae_over), f"{root}/vae")
rec_report = vae.evaluate(metrics=("reconstruction",))
vae_table = {
    "steps": vae.step,
    "parameters (M)": vae.task.count_params() / 1e6,
    "test PSNR (dB)": rec_report["recon_psnr"],
    "test MSE": rec_report["recon_mse"],
    "rate (bits/dim)": rec_report["rate_bpd"],
    "test images": rec_report["recon_num_examples"],
}
print(pd.Series(vae_table).to_frame("autoencoder").T)
timed("1. autoencoder: train + PSNR/rate", t0)

# %% [markdown]
# Reconstructions: rows alternate real test images and the decoded posterior means.

# %%
test_u8 = load_split(vae.config.data, "test")[0]
originals = test_u8[:num_eval_samples]  # also the FD of reconstructions below
recs = vae.task.reconstructions(vae.params, originals)
rows = [np.concatenate([originals[i : i + 8], recs[i : i + 8]]) for i in range(0, 32, 8)]
api.show(np.concatenate(rows), ncols=8, title="test images and their reconstructions, row by row")

# %% [markdown]
# Prior samples: decode(z), z ~ N(0, I). Poor by design with kl_weight 1e-6: the posterior
# is barely pulled towards N(0, I). The latent diffusion model learns the latents'
# distribution instead.

# %%
prior = vae.task.prior_samples(vae.params, 32, jax.random.PRNGKey(0))
api.show(prior, ncols=8, title="decode(z), z ~ N(0, I)")

# %% [markdown]
# ## 2. The judge, and FD of reconstructions and of prior samples
# FD in the feature space of a clean classifier of 32x32 images (not FID; comparable within
# this notebook). Reconstructions: of the first N test images, against the features of
# all 10,000 test images (which contain them: the FD of those N originals is the floor);
# prior samples: N decodings of z ~ N(0, I). Real train images give the FD of a perfect
# generator of N samples.

# %%
t0 = time.time()
judge_dir = f"{root}/judge"
judge_run = api.train(
    api.config(
        "classifier:tiny,clean" if models == "tiny" else "classifier:cpu,clean",
        **{**data, **short_run, "data.image_size": 32, "train.num_steps": judge_steps},
    ),
    judge_dir,
)
judge_accuracy = judge_run.evaluate(metrics=("accuracy",))["test_accuracy"]
print(f"judge test accuracy: {judge_accuracy:.3f}")
ev = {"eval.judge_workdir": judge_dir, "eval.num_samples": num_eval_samples}

prior_report = vae.evaluate(metrics=("fd",), overrides=ev)
judge = registry.load_judge(judge_dir, vae.mesh, vae.config.eval.batch_size)
ref, _ = reference_features(
    judge, vae.config.data, "test", test_u8, os.path.join(vae.workdir, "eval", "cache")
)
key = jax.random.PRNGKey(0)
recon_fd = compare_features(ref, judge(recs), vae.config.eval, key)
originals_fd = compare_features(ref, judge(originals), vae.config.eval, key)
vae_table.update(
    {
        "FD reconstructions": recon_fd["fd"],
        "FD their originals (floor)": originals_fd["fd"],
        "FD prior samples": prior_report["fd"],
        "FD real train images (floor)": prior_report["floor_fd"],
        "samples": len(recs),
        "judge test accuracy": judge_accuracy,
    }
)
vae_df = pd.Series(vae_table).to_frame("autoencoder, Fashion-MNIST 32x32 -> 8x8x4").T
timed("2. judge + FD of reconstructions and prior", t0)
vae_df.round(3)

# %% [markdown]
# ## 3. Latent vs pixel diffusion at equal training time
# The same class-conditional recipe (CFG, p_uncond 0.1, DDPM's schedule) on the 8x8x4
# latents (`configs/ldm.py`, the training set encoded once and cached) and on the 32x32
# pixels (`configs/cfg.py`), each trained for `train_seconds` of wall clock on this machine
# (its speed measured over `calibration_steps` first), both with `num_res_blocks`,
# `diffusion_lr` and the short-run warm-up and EMA. Samples: the same sampler, steps and
# CFG weight for both, classes in turn; FD, recall and the judge's accuracy on the class
# asked. Sampling images/s: the batches after the first (which compiles), latents decoded
# included.

# %%
t0 = time.time()
common = {
    **data,
    **short_run,
    "optim.lr": diffusion_lr,
    "model.num_res_blocks": num_res_blocks,
    "train.sample_every": 0,
    "train.log_every": max(1, min(50, calibration_steps // 4)),
    "sample.sampler": sampler,
    "sample.num_steps": sample_steps,
    "sample.guidance_scale": guidance,
    "sample.batch_size": sample_batch,
}
num_batches = max(2, -(-num_eval_samples // sample_batch))  # the first one compiles
runs, rows, samples = {}, [], {}
for name, spec, extra in (
    ("latent (8x8x4)", "ldm" + variant, {"latent.autoencoder": f"{root}/vae"}),
    ("pixel (32x32x1)", "cfg" + variant, {"data.image_size": 32}),
):
    t1 = time.time()
    workdir = f"{root}/{'latent' if name.startswith('latent') else 'pixel'}"
    run = train_for(api.config(spec, **common, **extra), workdir, train_seconds)
    steps, secs, speed = trained_seconds(run)
    train_wall = time.time() - t1
    batches, times = [], []
    for b in range(num_batches):  # whole batches: the one compiled sampler (and decoder)
        t1 = time.time()
        batches.append(run.sample(sample_batch, seed=b))  # classes 0, 1, ... in turn
        times.append(time.time() - t1)
    x = np.concatenate(batches)
    y = np.tile(np.arange(sample_batch) % 10, num_batches)
    quality = compare_features(ref, judge(x), run.config.eval, key)
    runs[name], samples[name] = run, x
    rows.append(
        {
            "model": name,
            "parameters (M)": run.task.count_params() / 1e6,
            "train steps": steps,
            "train seconds": secs,
            "train images/s": speed,
            "sample images/s": sample_batch * (num_batches - 1) / sum(times[1:]),
            "FD": quality["fd"],
            "judge accuracy": float(np.mean(judge.predict(x) == y)),
            "recall": quality["recall"],
            "samples": len(x),
            "wall s (train incl. compiles, encoding)": train_wall,
        }
    )
speed_df = pd.DataFrame(rows).set_index("model")
print(
    f"{sampler}, {sample_steps} steps, CFG w = {guidance}; {len(ref)} test images as the "
    f"reference; FD of as many real train images: {prior_report['floor_fd']:.3f}"
)
timed("3. latent vs pixel", t0)
speed_df.round(3)

# %%
fig, axes = plt.subplots(1, 3, figsize=(11, 3))
for ax, col in zip(axes, ("train images/s", "sample images/s", "FD"), strict=True):
    ax.bar(range(len(speed_df)), speed_df[col], color=["C0", "C1"])
    ax.set_xticks(range(len(speed_df)), [m.split()[0] for m in speed_df.index])
    ax.set_title(col + (" (lower is better)" if col == "FD" else ""), fontsize=9)
fig.suptitle(f"equal training time ({train_seconds:g} s each)", fontsize=9)
fig.tight_layout()
plt.show()
for name, x in samples.items():
    api.show(by_class(x), ncols=8, title=f"{name}: one class a row")

# %% [markdown]
# The latent space the U-Net sees: the scaled posterior means z * scale of the training
# images, per channel, against N(0, 1) (LDM's scale = 1 / std of the latents).

# %%
ldm = runs["latent (8x8x4)"]
moments = ldm.task.posteriors(ldm.task.load_train_split()[0], "train", ldm.workdir)
mean = np.split(moments, 2, axis=-1)[0] * ldm.task.scale_factor
fig, ax = plt.subplots(figsize=(5, 3))
grid = np.linspace(-4, 4, 81)
for c in range(mean.shape[-1]):
    ax.hist(mean[..., c].ravel(), bins=grid, density=True, histtype="step", label=f"ch {c}")
ax.plot(grid, np.exp(-(grid**2) / 2) / np.sqrt(2 * np.pi), "k--", lw=0.8, label="N(0, 1)")
ax.set(xlabel=f"scaled latent (scale {ldm.task.scale_factor:.3f})", ylabel="density")
ax.legend(fontsize=7)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 4. Text to image: cross-attention to tokens (latent) vs the pooled embedding (pixels)
# One CLIP (`configs/clip.py`) conditions both: the latent model's U-Net cross-attends to
# its text encoder's token sequence (Stable Diffusion's way, `configs/ldm_text2img.py`);
# the pixel model of `configs/text2img.py` is conditioned on the pooled CLIP embedding.
# Each trains for `t2i_seconds`. CLIP score (100 x cosine in that CLIP's space) of samples
# from the class prompts against their own prompt and against shuffled prompts: a gap is
# what the text conditioning achieved; real test images give the scale.

# %%
t0 = time.time()
clip_run = api.train(
    api.config("clip" + text_variant, **{**data, "train.num_steps": clip_steps}), f"{root}/clip"
)
clip_dir = f"{root}/clip/hf_clip"
text_common = {
    **data,
    "text.clip_dir": clip_dir,
    "train.sample_every": 0,
    "train.log_every": max(1, min(50, calibration_steps // 4)),
    "sample.sampler": sampler,
    "sample.num_steps": sample_steps,
    "sample.batch_size": sample_batch,
}
if not small:
    text_common["train.batch_size"] = t2i_batch
pooled = train_for(
    api.config("text2img" + text_variant, **text_common, **short_run),
    f"{root}/t2i_pooled",
    t2i_seconds,
)
tokens = train_for(
    api.config(
        "ldm_text2img" + variant,
        **text_common,
        **short_run,
        **{
            "optim.lr": diffusion_lr,
            "model.num_res_blocks": num_res_blocks,
            "latent.autoencoder": f"{root}/vae",
        },
    ),
    f"{root}/t2i_tokens",
    t2i_seconds,
)
clip = pooled.task.encoder  # the conditioning CLIP, as image and text embedder
prompts = pooled.task.class_prompts()
t2i_test_u8, test_y = load_split(pooled.config.data, "test")
real_emb = pooled.task.image_embeddings(clip, t2i_test_u8, "test", pooled.workdir)
text_rows, text_samples = [], {}
for name, run, conds in (
    ("latent, cross-attention to tokens", tokens, np.arange(len(prompts))),
    ("pixel, pooled embedding", pooled, clip.embed_texts(prompts)),
):
    x = run.sample(num_clip_samples, labels=conds, seed=0)
    y = np.arange(len(x)) % len(prompts)
    r = clip_report(clip.embed_texts(prompts), clip.embed_images(x), y, real_emb, test_y)
    steps, secs, _ = trained_seconds(run)
    text_samples[name] = x
    text_rows.append(
        {
            "model": name,
            "parameters (M)": run.task.count_params() / 1e6,
            "train steps": steps,
            "train seconds": secs,
            "CLIP score, own prompt": r["clip_score"],
            "own ± sem": r["clip_score_sem"],
            "CLIP score, shuffled": r["clip_score_shuffled"],
            "shuffled ± sem": r["clip_score_shuffled_sem"],
            "CLIP zero-shot = asked": r["clip_accuracy"],
            "samples": len(x),
        }
    )
text_df = pd.DataFrame(text_rows).set_index("model")
print(
    f"CFG w = {tokens.config.sample.guidance_scale:g} (both), {sampler} {sample_steps} steps; "
    f"real test images: own {r['real_clip_score']:.2f}, shuffled "
    f"{r['real_clip_score_shuffled']:.2f}, zero-shot accuracy {r['real_clip_accuracy']:.3f}"
)
timed("4. CLIP + text-to-image pair", t0)
text_df.round(3)

# %%
for name, x in text_samples.items():
    api.show(by_class(x, per=6), ncols=6, title=f"{name}: one prompt a row ({prompts[0]}, ...)")

# %% [markdown]
# Where the time went (this process, compiles included):

# %%
pd.Series(timings).to_frame("seconds").round(1)
