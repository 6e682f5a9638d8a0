"""The KL autoencoder of latent diffusion on Fashion-MNIST (zero-padded to 32x32):
32x32x1 images <-> 8x8x4 latents (downsampling f = 4; 256 latent numbers for 1024 pixels).

Commands:
    python -m diffax_lab.main --config=configs/vae.py --workdir=workdirs/vae
    python -m diffax_lab.main --workdir=workdirs/vae --mode=sample  # real | reconstructed rows,
                                                                    # and prior samples
    python -m diffax_lab.main --workdir=workdirs/vae --mode=eval    # test MSE, PSNR, rate
Then configs/ldm.py trains a U-Net on its latents (latent.autoencoder=workdirs/vae). After
training, DIR/hf_vae is a diffusers AutoencoderKL folder of the EMA weights whose
scaling_factor is estimated on training images (1 / std of the latents, as LDM does).

diffusers' AutoencoderKL (diffax_lab/models/vae.py), its architecture in the ``autoencoder``
section under diffusers' field names, trained with LDM's objective without LPIPS and the
discriminator: summed L1 error + kl_weight * KL(q(z|x) || N(0, I)), kl_weight = 1e-6 as in
LDM's kl-f4/f8 configs (the latents are barely regularised; their scale is fixed afterwards by
the scale factor). Adam with LDM's betas (0.5, 0.9), no gradient clipping.
Why f = 4: LDM (Rombach et al. 2022, sec. 4.1) finds f = 4..16 the useful range on natural
images; Fashion-MNIST's 32x32 at f = 8 leaves 4x4 latents, too few for a U-Net with two
levels, while f = 4 keeps 8x8 (4 latent channels, as Stable Diffusion's VAE).
Variants: ``tiny`` (the tests' size, seconds), ``cpu`` (sized for 2 CPU cores).
Device, time and result: the default is sized for one GPU (its 20k steps: not yet run).
``cpu`` on the idle 2-core CPU (notebooks/06_latent_diffusion.py's render, 2026-12-05):
0.95M parameters, compile 10 s, 80 images/s (2.3 steps/s at batch 32); 1500 steps with
``optim.warmup_steps=100 optim.ema_decay=0.99`` took 11 min and give, on the 10,000 test
images: PSNR 27.6 dB, rate 4.04 bits/dim, FD of reconstructions 0.094 (their originals:
0.067) and of prior samples 31.3 in a clean 32x32 classifier's features
(docs/BENCHMARKS.md "Latent diffusion"). Its 3000 steps take about 22 minutes.
Data: `apt-get install dataset-fashion-mnist`, or set data.dir / $DIFFAX_DATA_DIR.
"""

from ml_collections import ConfigDict

from diffax_lab.config_lib import base


def get_config(arg: str | None = None):
    if arg not in (None, "", "tiny", "cpu"):
        raise ValueError(f"Unknown variant {arg!r} of configs/vae.py; choose '', 'tiny' or 'cpu'.")
    config = base("ddpm", "tiny" if arg == "tiny" else None)
    config.task = "autoencoder"
    config.model.name = "autoencoder_kl"  # architecture in the autoencoder section
    config.data.image_size = 32  # 28x28 zero-padded: divides by f = 4
    config.data.random_flip = False

    a = config.autoencoder = ConfigDict()
    # diffusers' AutoencoderKL fields (the exported config.json carries them):
    a.block_out_channels = (64, 128, 128)  # width per level; f = 2^(levels - 1) = 4
    a.layers_per_block = 2  # ResNet blocks per encoder level (decoder: + 1)
    a.latent_channels = 4
    a.norm_num_groups = 32  # GroupNorm groups; must divide every block_out_channels entry
    a.mid_block_add_attention = True  # self-attention in the middle blocks
    a.use_quant_conv = True  # 1x1 convolutions around the latent
    a.use_post_quant_conv = True
    # The objective (diffax_lab/diffusion/latent.py, autoencoder_loss):
    a.reconstruction = "l1"  # l1 (LDM's) | l2: summed over pixels
    a.kl_weight = 1e-6  # weight of KL(q(z|x) || N(0, I)) summed over latent dimensions
    a.learn_output_logvar = False  # LDM's learned scalar s: error / exp(s) + s per pixel
    a.output_logvar_init = 0.0  # s (its initial value when learned)
    # Training images whose posterior samples estimate the exported scaling_factor.
    a.scale_num_examples = 10_000
    # LDM's patch-GAN (tasks/autoencoder.py: hinge loss, adaptive weight, trained
    # simultaneously with the autoencoder by the one optimizer; no BatchNorm):
    a.discriminator = False
    a.disc_start = 5000  # steps before the adversarial terms switch on (LDM: 50001)
    a.disc_weight = 0.5  # times the adaptive weight lambda (LDM's kl-f configs: 0.5)
    a.disc_factor = 1.0  # weight of both adversarial losses once on
    a.disc_loss = "hinge"  # hinge | vanilla
    a.disc_ndf = 64  # width of the discriminator's first convolution
    a.disc_layers = 3  # stride-2 convolutions (receptive field 70 px for 3)

    o = config.optim
    o.optimizer = "adam"
    o.lr = 2e-4
    o.b1, o.b2 = 0.5, 0.9  # LDM's autoencoder optimizer
    o.warmup_steps = 500
    o.grad_clip = 0.0
    o.ema_decay = 0.999

    t = config.train
    t.batch_size = 64
    t.num_steps = 20_000
    t.checkpoint_every = 2000
    t.sample_every = 2000  # reconstruction grids during training
    t.log_every = 100
    config.sample.num = 32  # reconstructed test images and prior samples per grid
    config.sample.batch_size = 32
    config.eval.metrics = ()  # () = loss and reconstruction (+ fd/kid/pr with a judge)
    config.eval.num_examples = 2048
    config.eval.batch_size = 256

    if arg == "cpu":
        a.block_out_channels = (32, 64, 64)
        a.layers_per_block = 1
        a.norm_num_groups = 16
        o.lr = 1e-3
        o.warmup_steps = 100
        o.ema_decay = 0.995
        t.batch_size = 32
        t.num_steps = 3000
        t.checkpoint_every = 500
        t.sample_every = 1000
        a.scale_num_examples = 4096
        a.disc_ndf, a.disc_layers, a.disc_start = 32, 2, 1000
    elif arg == "tiny":
        a.block_out_channels = (8, 16, 16)
        a.layers_per_block = 1
        a.norm_num_groups = 4
        a.mid_block_add_attention = False  # less to compile
        a.disc_ndf, a.disc_layers, a.disc_start = 8, 2, 2
        a.scale_num_examples = 64
        o.lr = 1e-3
        o.warmup_steps = 2
        t.batch_size = 16
        t.num_steps = 6
        t.log_every = 2
        t.checkpoint_every = 2
        t.sample_every = 0
        config.sample.num = 8
        config.sample.batch_size = 8
        config.eval.num_examples = 32
        config.eval.batch_size = 16
    return config
