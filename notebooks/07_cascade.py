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
# ruff: noqa: E402, B018

# %% [markdown]
# # 07 · Cascades: super-resolution diffusion, its regression baseline, and the unCLIP prior
#
# Fashion-MNIST 14×14 → 28×28. In order of importance (a run cut short keeps the first):
# 1. a regression upsampler (SRResNet, L1) vs a super-resolution diffusion model with
#    Gaussian conditioning augmentation, by PSNR/SSIM against the real 28×28 images and by
#    FD/accuracy in a clean classifier's (the judge's) feature space, with bicubic as the
#    reference, at several augmentation levels s used at sampling;
# 2. a cascade (a 14×14 base, then each upsampler at each s) vs a base trained at 28×28
#    for the same training time: FD, judge accuracy, sampling time; one stage grid;
# 3. text → prior → decoder vs text → decoder (unCLIP): CLIP score, own vs shuffled prompts;
# 4. the cascade command itself (`configs/cascade.py`): its grid with one row per stage.
#
# Everything it needs (judge, CLIP, decoder, ...) is trained into `root` when absent; a
# second run reuses it. The defaults are sized for a 2-core CPU (about half an hour; the
# render's time is in docs/BENCHMARKS.md, "Cascades"). On a GPU, train longer at batch 128:
# papermill `-p batch 128 -p sr_steps 1200 -p base_steps 600 -p clip_steps 500 -p t2i_steps
# 800`. CI runs it with `small=True`.

# %% tags=["parameters"]
small = False  # True: the CI's seconds-long run (tests/test_notebooks.py injects it)
root = "workdirs/nb07"
data_dir = ""  # '' = Fashion-MNIST from $DIFFAX_DATA_DIR or the Debian package
batch = 64  # training batch of every model
judge_steps = 300  # the clean classifier at 28x28 (FD / accuracy)
up_steps = 600  # SRResNet
sr_steps = 800  # the diffusion upsampler (v prediction, configs/superres.py)
base_steps = 400  # the 14x14 class-conditional base
# the 28x28 base; None = as many seconds of training as the 14x14 base and the diffusion
# upsampler together (its speed measured over calibration_steps first)
base28_steps = None
calibration_steps = 100
clip_steps = 800
t2i_steps = 600  # the decoder: text2img on CLIP image embeddings
prior_steps = 800
num_eval = 500  # test images upsampled / samples drawn per row
num_reference = 2000  # real test images of the FD reference
aug_levels = (0.0, 0.05, 0.1, 0.2, 0.35)  # s at sampling (training draws s ~ U[0, 0.5])
sample_steps = 25  # DDIM steps of every diffusion stage
sample_batch = 100
# Every model here trains for a few hundred steps: a short warm-up, and an EMA that forgets
# the initial weights within the run (0.99^300 < 5%; the configs' 0.995-0.999 would keep
# 13-74% of them after 300-400 steps, and their samples and the judge would be noise).
short_run = {"optim.warmup_steps": 100, "optim.ema_decay": 0.99}

# %%
import ast
import os
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from diffax_lab import api, metrics
from diffax_lab.data import load_split, pipeline
from diffax_lab.diffusion import conditioning
from diffax_lab.evaluators.clip_score import clip_report
from diffax_lab.metrics.image_quality import psnr, ssim
from diffax_lab.tasks import registry

if isinstance(aug_levels, str):  # papermill -p passes a tuple as its text
    aug_levels = ast.literal_eval(aug_levels)
aug_levels = tuple(float(s) for s in aug_levels)
if small:
    judge_steps = up_steps = sr_steps = base_steps = calibration_steps = 2
    clip_steps = t2i_steps = prior_steps = 2
    batch, num_eval, num_reference, sample_batch = 16, 8, 16, 4
    aug_levels, sample_steps = (0.0, 0.2), 2
V = "tiny" if small else "cpu"
HI = 16 if small else 28  # the high resolution; the low one is HI / 2
LO = HI // 2
T0 = time.perf_counter()


def overrides(steps, **more):
    o = {"train.num_steps": steps, "train.batch_size": batch, **more}
    if not small:  # one checkpoint at the end; losses every 100 steps
        o.update({"train.checkpoint_every": max(steps, 1), "train.log_every": 100, **short_run})
    if data_dir:
        o["data.dir"] = data_dir
    return o


def train(name, workdir, steps, **more):
    t = time.perf_counter()
    run = api.train(api.config(name, **overrides(steps, **more)), os.path.join(root, workdir))
    print(f"{workdir}: step {run.step}, {time.perf_counter() - t:.1f} s (T+{elapsed():.0f} s)")
    return run


def elapsed():
    return time.perf_counter() - T0


def train_seconds(run):
    """Seconds of training steps (compilation excluded), from the logged images/s."""
    m = run.metrics
    if "images_per_sec" not in m or m["images_per_sec"].dropna().empty:
        return float("nan")
    ips = m.dropna(subset=["images_per_sec"])
    steps = ips["step"].diff().fillna(ips["step"].iloc[0] - 1).clip(lower=1)
    return float((steps * run.config.train.batch_size / ips["images_per_sec"]).sum())


judge_run = train(
    f"classifier:{V},clean",
    "judge",
    judge_steps,
    **{"data.image_size": HI, "train.batch_size": batch},
)
judge = registry.load_judge(judge_run.workdir, judge_run.mesh, 500)
test_u8, test_y = load_split(judge_run.config.data, "test")
real_feat = judge(test_u8[:num_reference])


def score(fake_u8, labels=None, paired=None):
    """FD against the reference, the judge's accuracy on ``labels``, PSNR/SSIM against
    ``paired`` (the real high-resolution images), of uint8 images."""
    r = {
        "fd": float(
            metrics.frechet_distance(
                *metrics.feature_statistics(real_feat),
                *metrics.feature_statistics(judge(fake_u8)),
            )
        )
    }
    if labels is not None:
        r["judge_accuracy"] = float(np.mean(judge.predict(fake_u8) == labels))
    if paired is not None:
        r["psnr"] = float(np.mean(psnr(fake_u8, paired)))
        r["ssim"] = float(np.mean(ssim(fake_u8, paired)))
    return r


def u8(x):
    return np.asarray(pipeline.to_uint8(jnp.asarray(x)))


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    jax.block_until_ready(out)
    return out, time.perf_counter() - t


sampling = {"sample.num_steps": sample_steps, "sample.batch_size": sample_batch}
up = train(f"upsampler:{V}", "up", up_steps, **{"sample.batch_size": sample_batch})
sr = train(f"superres:{V}", "sr", sr_steps, **sampling)
sr.metrics.tail(3)

# %% [markdown]
# ## 1 · Regression vs diffusion upsampler, 14×14 → 28×28 of real test images
# The first `num_eval` test images, area-downsampled; PSNR/SSIM against the real 28×28
# images, FD and judge accuracy (on the test labels) of the upsampled images. The diffusion
# upsampler samples at each level s (DDIM, `sample_steps`); one compiled sampler serves all
# levels (s is data of the condition). Real train images give the metrics' floor.

# %%
real = test_u8[:num_eval]
labels = test_y[:num_eval]
x_lr = conditioning.area_downsample(pipeline.to_model_range(jnp.asarray(real)), 2)
key = jax.random.PRNGKey(0)
sr.task.upsample(sr.params, x_lr[:sample_batch], key)  # compile once, outside the timings
up.task.upsample(up.params, x_lr[:sample_batch])
bicubic = u8(jnp.clip(conditioning.resize_up(x_lr, HI, "bicubic"), -1, 1))
rows = [
    {
        "upsampler": "real train images (floor)",
        **score(load_split(judge_run.config.data, "train")[0][:num_eval]),
    },
    {"upsampler": "bicubic", **score(bicubic, labels, real), "seconds": 0.0},
]
out, sec = timed(up.task.upsample, up.params, x_lr)
rows.append({"upsampler": "SRResNet (L1)", **score(u8(out), labels, real), "seconds": sec})
sr_real = {}
for s in aug_levels:
    out, sec = timed(sr.task.upsample, sr.params, x_lr, key, aug_level=s)
    sr_real[s] = u8(out)
    rows.append(
        {"upsampler": f"diffusion, s={s:g}", **score(sr_real[s], labels, real), "seconds": sec}
    )
cols = ["upsampler", "psnr", "ssim", "fd", "judge_accuracy", "seconds"]
table_real = pd.DataFrame(rows)[cols]
print(
    f"device: {jax.devices()[0].device_kind}; {num_eval} images, DDIM {sample_steps}; T+{elapsed():.0f} s"
)
table_real.round(3)

# %%
show_n = 8
api.show(
    np.concatenate(
        [
            u8(conditioning.resize_up(x_lr[:show_n], HI, "nearest")),
            bicubic[:show_n],
            u8(up.task.upsample(up.params, x_lr[:show_n]))[:show_n],
            *[sr_real[s][:show_n] for s in aug_levels[:2]],
            real[:show_n],
        ]
    ),
    ncols=show_n,
    title=f"rows: {LO}px input, bicubic, SRResNet, diffusion s={aug_levels[0]:g} / "
    f"s={aug_levels[1]:g}, real",
)

# %% [markdown]
# ## 2 · Cascade: a 14×14 base, then each upsampler at each level s, vs a 28×28 base
# Both bases are the class-conditional U-Net of `configs/ddpm.py:cpu` (labels 0..9 in
# turn, so the judge's accuracy is on the class asked). The 28×28 base trains for as many
# seconds as the 14×14 base and the diffusion upsampler together: its speed is measured
# over `calibration_steps`, which sets its step count (or `base28_steps` if given);
# `train_s` (seconds of training steps, compilation excluded) shows how close. Here the
# upsampler's input is a sample, not a downsampled real image: conditioning augmentation
# (s > 0) is meant for this case; the best s is the one of the lowest FD.

# %%
cond = {"model.num_classes": 10, **sampling}
base14 = train(f"ddpm:{V}", "base14", base_steps, **{**cond, "data.image_size": LO})
budget = train_seconds(base14) + train_seconds(sr)
if base28_steps is None:  # the same seconds of training: its speed sets the steps
    first = train(f"ddpm:{V}", "base28", calibration_steps, **{**cond, "data.image_size": HI})
    speed = first.step / train_seconds(first)  # steps/s (nan when nothing was timed)
    base28_steps = max(first.step, int(budget * speed) if np.isfinite(speed) else 0)
base28 = train(f"ddpm:{V}", "base28", base28_steps, **{**cond, "data.image_size": HI})
sample_labels = np.arange(num_eval) % 10

base14.sample(sample_batch, seed=1)  # compile outside the timings
lo, t_lo = timed(base14.sample, num_eval, seed=0)
x_lo = pipeline.to_model_range(jnp.asarray(lo))
rows = [
    {
        "pipeline": f"bicubic of the {LO}px base",
        **score(u8(jnp.clip(conditioning.resize_up(x_lo, HI, "bicubic"), -1, 1)), sample_labels),
        "sampling_s": t_lo,
    }
]
out, sec = timed(up.task.upsample, up.params, x_lo)
rows.append(
    {
        "pipeline": f"{LO}px base + SRResNet",
        **score(u8(out), sample_labels),
        "sampling_s": t_lo + sec,
    }
)
cascade_out = {}
for s in aug_levels:
    out, sec = timed(sr.task.upsample, sr.params, x_lo, key, aug_level=s)
    cascade_out[s] = u8(out)
    rows.append(
        {
            "pipeline": f"{LO}px base + diffusion s={s:g}",
            **score(cascade_out[s], sample_labels),
            "sampling_s": t_lo + sec,
        }
    )
base28.sample(sample_batch, seed=1)
hi, t_hi = timed(base28.sample, num_eval, seed=0)
rows.append({"pipeline": f"{HI}px base", **score(hi, sample_labels), "sampling_s": t_hi})
table_cascade = pd.DataFrame(rows)
table_cascade["train_s"] = train_seconds(base14)
table_cascade.loc[1:, "train_s"] = train_seconds(base14) + train_seconds(up)
table_cascade.loc[2:, "train_s"] = budget
table_cascade.loc[len(rows) - 1, "train_s"] = train_seconds(base28)
best = min(aug_levels, key=lambda s: table_cascade.loc[2 + aug_levels.index(s), "fd"])
print(
    f"{LO}px base: {base14.step} steps; {HI}px base: {base28.step} steps "
    f"({budget:.1f} s of training for the cascade); best s on base samples: {best:g}; "
    f"T+{elapsed():.0f} s"
)
table_cascade.round(3)

# %%
fig, ax = plt.subplots(figsize=(5, 3.2))
ax.plot(aug_levels, [r["fd"] for r in rows[2 : 2 + len(aug_levels)]], "o-", label="base samples")
ax.plot(aug_levels, table_real["fd"].iloc[3:].to_numpy(), "s--", label="real low-res input")
ax.axhline(rows[-1]["fd"], color="gray", lw=0.8, label=f"{HI}px base")
ax.set(xlabel="augmentation level s at sampling", ylabel="FD (judge features)")
ax.legend(fontsize=7)
fig.tight_layout()
plt.show()

# %% [markdown]
# One cascade, each stage a row: the 14×14 base (nearest-neighbour to 28×28 for display),
# SRResNet, the diffusion upsampler at s = 0 and at the best s; then the 28×28 base.

# %%
n = 10
stages = [
    u8(conditioning.resize_up(x_lo[:n], HI, "nearest")),
    u8(up.task.upsample(up.params, x_lo[:n]))[:n],
    cascade_out[aug_levels[0]][:n],
    cascade_out[best][:n],
    hi[:n],
]
api.show(
    np.concatenate(stages),
    ncols=n,
    title=f"{LO}px base | SRResNet | diffusion s={aug_levels[0]:g} | s={best:g} | {HI}px base",
)

# %% [markdown]
# ## 3 · unCLIP: text → prior → decoder vs text → decoder
# A CLIP trained here (`configs/clip.py`), the decoder `configs/text2img.py` (the U-Net
# conditioned on CLIP *image* embeddings, classifier-free guidance w = 2), and the prior
# `configs/prior.py` (an MLP over embeddings, x0 prediction) that maps the CLIP *text*
# embedding of a prompt to an image embedding. The decoder is given either the prompt's
# text embedding directly or the prior's draw for it; the samples' CLIP score against
# their own prompt vs a shuffled one (and the judge's accuracy on the class asked).

# %%
clip = train("clip" + (":tiny" if small else ""), "clip", clip_steps)
clip_dir = os.path.join(root, "clip", "hf_clip")
t2i = train(
    "text2img" + (":tiny" if small else ""),
    "t2i",
    t2i_steps,
    **{"text.clip_dir": clip_dir, **sampling},
)
prior = train(
    "prior" + (":tiny" if small else ""), "prior", prior_steps, **{"text.clip_dir": clip_dir}
)
enc = t2i.task.encoder
prompts = t2i.task.class_prompts()
y = np.arange(num_eval) % len(prompts)
text_emb = enc.embed_texts([prompts[i] for i in y])
prior_out, t_prior = timed(
    lambda: prior.task.generate(prior.params, num_eval, jax.random.PRNGKey(3), labels=text_emb)[0]
)
image_emb = prior.task.normalise(prior_out)
t2i_test_u8, t2i_test_y = load_split(t2i.config.data, "test")
real_emb = enc.embed_images(t2i_test_u8[:num_reference])
prompt_emb = enc.embed_texts(prompts)
t2i.sample(sample_batch, labels=text_emb[:sample_batch], seed=1)  # compile
rows, drawn = [], {}
for name, c, t_extra in (
    ("text -> decoder", text_emb, 0.0),
    ("text -> prior -> decoder", image_emb, t_prior),
):
    drawn[name], sec = timed(t2i.sample, num_eval, labels=c, seed=0)
    r = clip_report(
        prompt_emb, enc.embed_images(drawn[name]), y, real_emb, t2i_test_y[:num_reference]
    )
    row = {"pipeline": name, **{k: r[k] for k in r if k.startswith(("clip_score", "clip_acc"))}}
    if drawn[name].shape[1] == HI:  # the judge's resolution (not in the small run)
        row["judge_accuracy"] = float(np.mean(judge.predict(drawn[name]) == y))
    rows.append({**row, "sampling_s": sec + t_extra})
rows.append(
    {
        "pipeline": "real test images, true captions",
        **{k[5:]: r[k] for k in r if k.startswith(("real_clip_score", "real_clip_acc"))},
    }
)
cos_own = float(np.mean(np.sum(image_emb * text_emb, -1)))
table_unclip = pd.DataFrame(rows)
print(
    f"prior draws: mean cosine to their prompt's text embedding {cos_own:.3f}; T+{elapsed():.0f} s"
)
table_unclip.round(3)

# %%
per = min(len(prompts), 10)
api.show(
    np.concatenate([drawn["text -> decoder"][:per], drawn["text -> prior -> decoder"][:per]]),
    titles=[p.split()[-1] for p in prompts[:per]] * 2,
    ncols=per,
    title="top: text -> decoder; bottom: text -> prior -> decoder",
)

# %% [markdown]
# ## 4 · The cascade command (`configs/cascade.py`): base → upsampler, one row per stage
# The same runs chained by `--mode=sample` (here in-process); it writes
# `ROOT/cascade/samples/cascade_stages.png`.

# %%
from diffax_lab import config_lib
from diffax_lab.modes import sample as sample_mode

cascade = config_lib.load_config("cascade.py" + (":tiny" if small else ""))
cascade.cascade.base_workdir = base14.workdir
cascade.cascade.upsampler_workdirs = (sr.workdir,)
cascade.cascade.steps = (sample_steps, sample_steps)
cascade.cascade.aug_levels = (float(best),)
cascade.sample.num = cascade.sample.batch_size = sample_batch if not small else 4
cascade.data.image_size = HI
if data_dir:
    cascade.data.dir = data_dir
out = sample_mode.run(cascade, os.path.join(root, "cascade"))
n = min(10, len(out["samples"]))
api.show(
    np.concatenate(
        [
            np.asarray(st)[:n]
            if st.shape[1] == HI
            else u8(
                conditioning.resize_up(pipeline.to_model_range(jnp.asarray(st[:n])), HI, "nearest")
            )
            for st in out["stages"]
        ]
    ),
    ncols=n,
    title=" | ".join(
        f"{name}: {s:.2f} s (compile included)"
        for name, s in zip(["base", "upsampler"], out["stage_seconds"], strict=True)
    ),
)
print(f"{out['stages_grid']}; total T+{elapsed():.0f} s")
