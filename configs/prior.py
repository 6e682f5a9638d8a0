"""The unCLIP prior on Fashion-MNIST: CLIP text embedding of a caption -> CLIP image
embedding (DALL-E 2's prior; diffax_lab/tasks/prior.py), for text -> prior -> decoder.

Commands (a CLIP first, configs/clip.py -> workdirs/clip/hf_clip; the decoder is
configs/text2img.py, already trained on CLIP image embeddings):
    python -m diffax_lab.main --config=configs/prior.py --workdir=workdirs/prior
    python -m diffax_lab.main --mode=sample --config=configs/cascade.py:unclip \
        --workdir=workdirs/unclip     # text -> prior -> text2img decoder (-> upsamplers)
An MLP of 4 residual blocks (width 256) over the 64-dim embeddings, x0 prediction, cosine
schedule with T = 1000, 10% of the captions dropped for classifier-free guidance. Variant
``tiny``: the tests' size (16-dim embeddings).
Device, time and result (notebooks/07_cascade.py's render, idle 2-core CPU, 2026-12-05):
800 steps at batch 64 with EMA 0.99 in 60 s with its compile, on an 800-step
configs/clip.py. Decoding its draws with a 600-step configs/text2img.py raises the CLIP
score of samples against their own prompt from 54.6 to 56.9, and lowers it against
shuffled prompts from 18.2 to 16.3 (docs/BENCHMARKS.md "Cascades").
"""

from ml_collections import ConfigDict

from diffax_lab.config_lib import base
from diffax_lab.data.captions import FASHION_MNIST_CLASSES


def get_config(arg: str | None = None):
    if arg not in (None, "", "tiny"):
        raise ValueError(f"Unknown variant {arg!r} of configs/prior.py; choose '' or 'tiny'.")
    tiny = arg == "tiny"
    config = base("ddpm", "tiny" if tiny else "cpu")
    config.task = "prior"
    config.prior = ConfigDict()
    config.prior.dim = 16 if tiny else 64  # the CLIP's projection_dim
    config.prior.width = 32 if tiny else 256
    config.prior.depth = 1 if tiny else 4
    config.text = ConfigDict()
    config.text.clip_dir = "workdirs/clip/hf_clip"
    config.text.class_names = FASHION_MNIST_CLASSES  # captions: data/captions.py templates
    config.model.cond_dim = config.prior.dim
    config.diffusion.schedule = "cosine"
    config.diffusion.prediction = "x0"  # DALL-E 2 predicts the clean embedding
    config.train.p_uncond = 0.1
    config.train.sample_every = 0
    config.train.num_steps = 4 if tiny else 3000
    config.train.batch_size = 16 if tiny else 256
    config.optim.lr = 3e-4 if not tiny else 1e-3
    config.optim.ema_decay = 0.999 if not tiny else 0.9
    config.sample.sampler = "ddim"
    config.sample.num_steps = 2 if tiny else 64
    config.sample.guidance_scale = 1.0
    config.sample.clip_x0 = 0.0  # embeddings are not pixels: no clipping of x0
    config.sample.prompts = ("a photo of a sneaker", "a photo of a dress", "a photo of a bag")
    config.eval.metrics = ("loss",)
    return config
