"""The regression upsampler (SRResNet, L1), Fashion-MNIST 14x14 -> 28x28: the baseline of
the super-resolution diffusion model (configs/superres.py), in the same evaluation.

Commands:
    python -m diffax_lab.main --config=configs/upsampler.py:cpu --workdir=workdirs/up
    python -m diffax_lab.main --workdir=workdirs/up --mode=sample
    python -m diffax_lab.main --workdir=workdirs/up --mode=eval \
        --config.eval.metrics='("psnr","ssim","fd")' --config.eval.judge_workdir=JUDGE28
Variants: ``tiny`` (the tests' 8 -> 16 px), ``cpu`` (32 features, 4 blocks); the default has
64 features and 8 blocks. ``upsampler.loss='l2'`` for the mean-squared error.
Device, time and result (notebooks/07_cascade.py's render, idle 2-core CPU, 2026-12-05):
``cpu`` at batch 64, 600 steps in 84 s with its compile; on 500 real test images PSNR
24.5 dB, SSIM 0.865, FD 0.198 (docs/BENCHMARKS.md "Cascades").
"""

from ml_collections import ConfigDict

from diffax_lab.config_lib import base


def get_config(arg: str | None = None):
    if arg not in (None, "", "tiny", "cpu"):
        raise ValueError(f"Unknown variant {arg!r} of configs/upsampler.py; choose '', tiny, cpu.")
    config = base("ddpm", "tiny" if arg == "tiny" else "cpu")
    config.task = "upsampler"
    config.model.name = "srresnet"  # models/srresnet.py, from the upsampler section
    config.upsampler = ConfigDict()
    config.upsampler.factor = 2  # high resolution = data.image_size, low = image_size / factor
    config.upsampler.features = 64
    config.upsampler.num_blocks = 8
    config.upsampler.groups = 8  # GroupNorm groups (in place of SRResNet's batch norm)
    config.upsampler.loss = "l1"  # l1 | l2
    config.data.image_size = 28
    config.optim.lr = 1e-3
    config.optim.warmup_steps = 100
    config.optim.ema_decay = 0.99
    config.train.sample_every = 0
    config.train.num_steps = 4000
    config.sample.num = 32
    config.sample.batch_size = 32
    config.eval.num_samples = 500
    if arg == "tiny":
        config.data.image_size = 16
        config.upsampler.features = 8
        config.upsampler.num_blocks = 1
        config.upsampler.groups = 4
        config.optim.warmup_steps = 2
        config.train.num_steps = 4
        config.sample.num = 4
        config.sample.batch_size = 4
        config.eval.num_samples = 4
        config.eval.num_examples = 8
        config.eval.batch_size = 8
    elif arg == "cpu":
        config.upsampler.features = 32
        config.upsampler.num_blocks = 4
        config.train.num_steps = 1500
    return config
