"""Latent diffusion on Fashion-MNIST: a class-conditional U-Net with classifier-free guidance
trained on the 8x8x4 latents of the KL autoencoder of configs/vae.py (Rombach et al. 2022).

Commands (the autoencoder first):
    python -m diffax_lab.main --config=configs/vae.py --workdir=workdirs/vae
    python -m diffax_lab.main --config=configs/ldm.py --workdir=workdirs/ldm
    python -m diffax_lab.main --workdir=workdirs/ldm --mode=sample \
        --config.sample.guidance_scale=1.0
    python -m diffax_lab.main --workdir=workdirs/ldm --mode=eval \
        --config.eval.judge_workdir=workdirs/clean   # fd/kid/pr of decoded samples
latent.autoencoder is the autoencoder run's workdir (its EMA weights) or any diffusers
AutoencoderKL folder that takes 32x32x1 images (e.g. workdirs/vae/hf_vae). The training set
is encoded once and cached in the workdir; the U-Net sees z * scale with z ~ q(z|x) drawn at
every step and scale = 1 / std of the training latents (LDM's estimate; latent.scale_factor
> 0 gives it instead, e.g. 0.18215 for Stable Diffusion's VAE). Samples are decoded before
they are written or judged, so fd/kid/pr land in the table of the pixel models (same judge).
The U-Net of configs/cfg.py on 8x8 latents: two levels (8 -> 4), attention at both; the
diffusion section is DDPM's (linear betas, T = 1000, eps).
Variants: ``tiny`` (the tests' size, seconds), ``cpu`` (sized for 2 CPU cores; expects
latent.autoencoder from configs/vae.py:cpu).
Device, time and result: the default is sized for one GPU (its 20k steps: not yet run).
notebooks/06_latent_diffusion.py compares ``cpu`` with the same recipe on pixels
(configs/cfg.py:cpu at 32x32) at equal wall-clock training time on the idle 2-core CPU
(2026-12-05; 6 minutes of training each, optim.lr=5e-4, warm-up 100, EMA 0.99; DDIM 50
steps, w = 1): the latent model trains at 604 images/s (0.70M parameters, batch 64; 3540
steps) against 69 (727 steps), samples at 45.7 images/s decoding included against 2.0, and
reaches FD 0.109 and judge accuracy 87.5% against 9.1 and 18% (docs/BENCHMARKS.md "Latent
diffusion"). Encoding and caching the 60,000 training images once is part of the 88 s by
which that run's wall time (463 s) exceeds its training time (375 s), compiles included.
"""

from ml_collections import ConfigDict

from diffax_lab.config_lib import base


def get_config(arg: str | None = None):
    if arg not in (None, "", "tiny", "cpu"):
        raise ValueError(f"Unknown variant {arg!r} of configs/ldm.py; choose '', 'tiny' or 'cpu'.")
    config = base("cfg", arg)  # class labels (10), p_uncond 0.1, CFG w = 1
    config.task = "latent_diffusion"
    config.data.image_size = 32  # pixels: the autoencoder's input (f = 4 -> 8x8 latents)
    config.data.random_flip = False  # refused: the step would flip latents

    config.latent = ConfigDict()
    # A lab autoencoder workdir (configs/vae.py) or a diffusers AutoencoderKL folder.
    config.latent.autoencoder = "workdirs/vae"
    # The U-Net sees z * scale_factor; 0 = estimate 1 / std(z) on the training latents.
    config.latent.scale_factor = 0.0
    config.latent.encode_batch_size = 256  # images per encoder pass when caching latents

    m = config.model  # sizes are of the 8x8 latents
    m.base_channels = 64
    m.channel_mult = (1, 2)  # 8 -> 4
    m.num_res_blocks = 2
    m.attention_resolutions = (8, 4)
    m.num_groups = 32
    config.sample.clip_x0 = 0.0  # refused otherwise: latents are not bounded by 1
    config.optim.lr = 2e-4

    if arg == "cpu":
        m.base_channels = 32
        m.num_res_blocks = 1
        m.attention_resolutions = (4,)
        m.num_groups = 8
        m.dropout = 0.0
        config.latent.autoencoder = "workdirs/vae_cpu"
        config.train.batch_size = 64
        config.train.num_steps = 3000
    elif arg == "tiny":
        m.base_channels = 16
        m.channel_mult = (1, 2)
        m.num_res_blocks = 1
        m.attention_resolutions = ()
        m.num_groups = 8
        config.latent.encode_batch_size = 64
        config.train.sample_every = 0
        config.train.checkpoint_every = 4
    return config
