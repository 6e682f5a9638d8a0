"""Class-conditional DDPM on Fashion-MNIST with classifier-free guidance (Ho & Salimans 2022).

Command:
    python -m diffax_lab.main --config=configs/cfg.py --workdir=workdirs/cfg
    python -m diffax_lab.main --config=configs/cfg.py --workdir=workdirs/cfg --mode=sample \
        --config.sample.guidance_scale=1.0
The U-Net of configs/ddpm.py with a 10-class label embedding plus a learned null label; 10%
of training labels are dropped to the null label. Sampling combines
(1 + w) eps_cond - w eps_uncond in one batched pass (w = 0: plain conditional; diffusers'
guidance_scale s = 1 + w) and writes guidance_sweep.png (rows w, columns classes).
Variants: ``tiny`` (tests), ``cpu`` (the 2-core CPU size of configs/ddpm.py:cpu).
No run of this config has been recorded yet.
"""

from diffax_lab.config_lib import base


def get_config(arg: str | None = None):
    config = base("ddpm", arg)
    config.model.num_classes = 10
    config.train.p_uncond = 0.1
    config.sample.guidance_scale = 1.0
    config.sample.num = 20  # two of each class
    config.sample.batch_size = 20
    if arg == "tiny":
        config.sample.num = 4
        config.sample.batch_size = 4
        config.sample.labels = (0, 1, 7, 9)
        config.sample.sweep_scales = (0.0, 2.0)
    return config
