"""Cascaded sampling: a base model, then upsamplers, each a run trained with its own config
(diffax_lab/tasks/cascade.py); this config trains nothing.

Fashion-MNIST 14x14 base -> 28x28 upsampler (the default names the workdirs of):
    python -m diffax_lab.main --config=configs/ddpm.py:cpu --workdir=workdirs/base14 \
        --config.data.image_size=14
    python -m diffax_lab.main --config=configs/superres.py:cpu --workdir=workdirs/sr
    python -m diffax_lab.main --mode=sample --config=configs/cascade.py --workdir=workdirs/cascade \
        [--config.cascade.aug_levels='(0.1,)' --config.cascade.samplers='("ddim","dpm_solver++")']
The first --mode=sample writes the cascade's config.json and a weightless step-0 checkpoint
into its workdir (the modes restore one before sampling); --mode=train is refused. Output:
samples/cascade.png (the last stage) and samples/cascade_stages.png (one row per stage).
``--mode=eval --config.eval.judge_workdir=JUDGE28`` gives FD/KID/PR of the final images.
unCLIP (text -> prior -> decoder -> upsampler): variant ``unclip`` (configs/prior.py);
its --mode=eval reports the CLIP score against own and shuffled prompts, and with
``--config.cascade.prior_workdir=''`` the same for text -> decoder directly.
Variant ``tiny``: the tests' 8 -> 16 px stages.
"""

from ml_collections import ConfigDict

from diffax_lab.config_lib import base
from diffax_lab.data.captions import FASHION_MNIST_CLASSES


def get_config(arg: str | None = None):
    if arg not in (None, "", "tiny", "unclip"):
        raise ValueError(f"Unknown variant {arg!r} of configs/cascade.py; choose '', tiny, unclip.")
    config = base("ddpm", "tiny" if arg == "tiny" else "cpu")
    config.task = "cascade"
    config.train.num_steps = 0  # a cascade trains nothing
    config.train.sample_every = 0
    config.data.image_size = 28  # the last stage's resolution
    config.cascade = ConfigDict()
    config.cascade.base_workdir = "workdirs/base14"
    config.cascade.upsampler_workdirs = ("workdirs/sr",)
    # Per stage (the base, then each upsampler): '' / -1 keep the run's own setting.
    config.cascade.samplers = ("ddim", "ddim")
    config.cascade.steps = (50, 50)
    config.cascade.guidance = (-1.0, -1.0)
    config.cascade.aug_levels = (-1.0,)  # per upsampler: s of conditioning augmentation
    # unCLIP: a text2img base decodes the image embeddings a prior draws for the prompts.
    config.cascade.prompts = ()
    config.cascade.prior_workdir = ""
    config.cascade.prior_sampler = ""
    config.cascade.prior_steps = -1
    config.cascade.prior_guidance = -1.0
    config.sample.num = 32
    config.sample.batch_size = 32
    config.eval.num_samples = 500
    if arg == "tiny":
        config.data.image_size = 16
        config.cascade.steps = (2, 2)
        config.sample.num = 4
        config.sample.batch_size = 4
        config.eval.num_samples = 4
    if arg == "unclip":
        config.cascade.base_workdir = "workdirs/t2i"
        config.cascade.prior_workdir = "workdirs/prior"
        config.cascade.upsampler_workdirs = ()
        config.cascade.samplers = ("ddim",)
        config.cascade.steps = (50,)
        config.cascade.guidance = (-1.0,)
        config.cascade.aug_levels = ()
        config.cascade.prompts = (
            "a photo of a t-shirt",
            "a photo of a trouser",
            "a photo of a sneaker",
            "a photo of a bag",
        )
        # --mode=eval: CLIP score (own vs shuffled prompts) of samples drawn from
        # text.template with each class name in turn; leave prior_workdir empty ('') for
        # text -> decoder directly.
        config.text = ConfigDict()
        config.text.class_names = FASHION_MNIST_CLASSES
        config.text.template = "a photo of a {}"
        config.eval.metrics = ("clip_score",)
        config.eval.num_samples = 200
    return config
