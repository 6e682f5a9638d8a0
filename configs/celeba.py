"""CelebA attributes-to-faces (the DLI course's final project) as a cascade: a 64x64
text-to-image base through CLIP, then a 64 -> 128 super-resolution diffusion upsampler.

Data: tfds ``celeb_a`` (data.source='tfds'; `pip install -e .[tfds]`, then once with
network access tfds downloads and prepares it, or copy the prepared data into data.dir).
The base is the text2img task: trained on the CLIP image embeddings of the faces, sampled
from the CLIP text embeddings of attribute prompts ("Photo of person bushy eyebrows, beard,
mouth slightly open, wearing hat.", diffax_lab/data/celeba.py). The CLIP is a pretrained
one in Hugging Face layout (text.clip_dir; model.cond_dim = its projection size, 512 for
ViT-B/32). Cosine schedule with T = 100, sampled with all 100 steps, as the course.

Commands (README "Cascades" has the whole recipe):
    python -m diffax_lab.main --config=configs/celeba.py --workdir=workdirs/celeba64
    python -m diffax_lab.main --config=configs/celeba.py:up --workdir=workdirs/celeba128
    python -m diffax_lab.main --mode=sample --config=configs/cascade.py --workdir=workdirs/cc \
        --config.cascade.base_workdir=workdirs/celeba64 \
        --config.cascade.upsampler_workdirs='("workdirs/celeba128",)' \
        --config.cascade.prompts='("Photo of person smiling, wearing hat.",)' \
        --config.data.image_size=128 --config.data.channels=3 \
        --config.cascade.samplers='("ddpm","ddim")' --config.cascade.steps='(0,50)'
Variants (comma-separated): ``up`` the 64 -> 128 upsampler (superres task); ``band`` the
time step as an extra constant image band instead of the sinusoidal embedding (the
course's conditioning; model.time_embedding='channel'); ``tiny`` the offline tests' size on
a synthetic folder in CelebA's original layout (data.source='folder',
data.dir=DIR/img_align_celeba; data.celeba.write_synthetic makes one). Not run here: no
CelebA and no GPU on this machine (docs/BENCHMARKS.md "Cascades").
"""

from diffax_lab.config_lib import base, parse_variants

VARIANTS = ("up", "band", "tiny")


def get_config(arg: str | None = None):
    variants = parse_variants(arg, VARIANTS, "configs/celeba.py")
    tiny = "tiny" in variants
    up = "up" in variants
    config = base("superres" if up else "text2img", "tiny" if tiny else None)
    c = config
    c.data.source = "tfds"
    c.data.name = "celeb_a"
    c.data.dir = ""
    c.data.channels = 3
    c.data.image_size = 128 if up else 64
    c.data.random_flip = True  # faces are symmetric enough
    c.data.num_examples = 0
    c.diffusion.schedule = "cosine"
    c.diffusion.num_timesteps = 100
    c.model.base_channels = 64
    c.model.channel_mult = (1, 2, 2, 2) if not up else (1, 1, 2, 2, 4)
    c.model.num_res_blocks = 2
    c.model.attention_resolutions = (16,) if not up else ()
    c.model.num_groups = 32
    c.model.dropout = 0.1
    c.optim.lr = 2e-4
    c.optim.warmup_steps = 1000
    c.optim.ema_decay = 0.9999
    c.train.batch_size = 64
    c.train.num_steps = 100_000
    c.train.checkpoint_every = 5000
    c.train.sample_every = 0
    c.sample.sampler = "ddpm"
    c.sample.num_steps = 0  # all T = 100
    c.sample.num = 16
    c.sample.batch_size = 16
    if up:
        c.superres.factor = 2  # 64 -> 128
        c.superres.aug_max = 0.5
        c.sample.sampler = "ddim"
        c.sample.num_steps = 50
        c.sample.aug_level = 0.1
        c.eval.num_samples = 1000
    else:
        c.text.clip_dir = "openai/clip-vit-base-patch32"  # or a local HF-layout directory
        c.model.cond_dim = 512  # the CLIP's projection_dim
        c.train.p_uncond = 0.1
        c.sample.guidance_scale = 2.0
        c.sample.prompts = (
            "Photo of person smiling.",
            "Photo of person blond hair, smiling, wearing lipstick.",
            "Photo of person eyeglasses, male.",
            "Photo of person bushy eyebrows, mouth slightly open, beard, wearing hat.",
        )
        c.text.template = "Photo of person {}."
        c.text.class_names = ("smiling", "eyeglasses", "blond hair", "wearing hat", "bald")
        c.eval.num_samples = 500
    if "band" in variants:
        c.model.time_embedding = "channel"  # t as one more constant input band
    if tiny:
        c.data.source = "folder"
        c.data.dir = "celeba_synthetic/img_align_celeba"  # tests point it at theirs
        c.data.test_fraction = 0.25
        c.data.image_size = 16 if up else 8
        c.model.base_channels = 8
        c.model.channel_mult = (1,)
        c.model.num_res_blocks = 1
        c.model.attention_resolutions = ()
        c.model.num_groups = 4
        c.model.dropout = 0.0
        c.optim.warmup_steps = 2
        c.optim.ema_decay = 0.9
        c.train.batch_size = 4
        c.train.num_steps = 2
        c.train.checkpoint_every = 2
        c.sample.num_steps = 2
        c.sample.num = 2
        c.sample.batch_size = 2
        c.eval.num_samples = 4
        c.eval.num_examples = 2
        c.eval.batch_size = 2
        if not up:
            c.text.clip_dir = ""  # tests: a random-weight CLIP they write
            c.model.cond_dim = 16
            c.sample.prompts = ("Photo of person smiling.", "Photo of person eyeglasses.")
    return config
