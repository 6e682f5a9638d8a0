"""DDPM on CIFAR-10, the paper's setting (Ho et al. 2020, App. B), through tensorflow-datasets.

Command (needs `pip install -e .[tfds]` and network access once for tfds to fetch CIFAR-10):
    python -m diffax_lab.main --config=configs/cifar10_ddpm.py --workdir=workdirs/cifar10
The 35.7M-parameter U-Net (128 channels, multipliers 1,2,2,2, 2 blocks, attention at 16x16,
dropout 0.1), linear schedule T = 1000, Adam lr 2e-4 with 5000 warm-up steps, gradient clip
1.0, EMA 0.9999, batch 128, random flips, 800k steps. The paper reports FID 3.17 after 800k
steps on a TPU v3-8; no run of this config has been recorded here yet.
"""

from diffax_lab.config_lib import base


def get_config(arg: str | None = None):
    config = base("ddpm")
    config.data.source = "tfds"
    config.data.name = "cifar10"
    config.data.dir = ""  # tfds data_dir ('' = tfds's default, ~/tensorflow_datasets)
    config.data.channels = 3
    config.data.random_flip = True

    config.model.base_channels = 128
    config.model.channel_mult = (1, 2, 2, 2)
    config.model.num_res_blocks = 2
    config.model.attention_resolutions = (16,)
    config.model.attention_heads = 1
    config.model.dropout = 0.1
    config.model.num_groups = 32

    config.optim.optimizer = "adam"
    config.optim.lr = 2e-4
    config.optim.warmup_steps = 5000
    config.optim.grad_clip = 1.0
    config.optim.ema_decay = 0.9999

    config.train.batch_size = 128
    config.train.num_steps = 800_000
    config.train.log_every = 500
    config.train.checkpoint_every = 10_000
    config.train.sample_every = 50_000
    if arg == "bf16":
        config.model.dtype = "bfloat16"
    elif arg not in (None, ""):
        raise ValueError(
            f"Unknown variant {arg!r} of configs/cifar10_ddpm.py; choose '' or 'bf16'."
        )
    return config
