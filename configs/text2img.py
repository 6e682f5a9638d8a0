"""Text-to-image on Fashion-MNIST through CLIP (the DLI course's Part 5 recipe).

Commands (a CLIP first: configs/clip.py writes workdirs/clip/hf_clip):
    python -m diffax_lab.main --config=configs/text2img.py --workdir=workdirs/t2i \
        --config.text.clip_dir=workdirs/clip/hf_clip
    python -m diffax_lab.main --config=configs/text2img.py --workdir=workdirs/t2i --mode=sample \
        --config.text.clip_dir=workdirs/clip/hf_clip \
        --config.sample.prompts='("a photo of a sneaker", "a photo of a dress")'
    python -m diffax_lab.main --config=configs/text2img.py --workdir=workdirs/t2i --mode=eval \
        --config.text.clip_dir=workdirs/clip/hf_clip \
        [--config.eval.clip_dir=ANOTHER_CLIP] [--config.eval.judge_workdir=CLEAN_CLASSIFIER]
The U-Net of configs/ddpm.py:cpu (28x28) conditioned on the CLIP image embedding of each
training image (cached in the workdir), 10% replaced by a learned null vector; sampling
conditions on the CLIP text embeddings of the prompts with classifier-free guidance
(sample.guidance_scale = w) and writes a grid with one row per prompt. Any CLIP directory in
Hugging Face layout works (a pretrained one needs data.image_size and the U-Net to match
its use; model.cond_dim must equal its projection size). --mode=eval reports CLIP scores of
samples drawn from text.template with each class name against their own and shuffled
prompts, beside real test images' (diffax_lab/text2img.py). Variant ``tiny``: the tests' size.
"""

from ml_collections import ConfigDict

from diffax_lab.config_lib import base
from diffax_lab.data.captions import FASHION_MNIST_CLASSES


def get_config(arg: str | None = None):
    if arg not in (None, "", "tiny"):
        raise ValueError(f"Unknown variant {arg!r} of configs/text2img.py; choose '' or 'tiny'.")
    config = base("ddpm", "tiny" if arg == "tiny" else "cpu")
    config.task = "text2img"
    config.text = ConfigDict()
    config.text.clip_dir = "workdirs/clip/hf_clip"  # Hugging Face layout (or a hub id online)
    # pooled: the CLIP embedding vector (model.cond_dim) | tokens: cross-attention to the
    # text encoder's token sequence (model.cond_dim = 0, model.cross_attention_dim = its width)
    config.text.conditioning = "pooled"
    config.model.cond_dim = 16 if arg == "tiny" else 64  # the CLIP's projection_dim
    config.train.p_uncond = 0.1
    config.train.sample_every = 0
    config.sample.guidance_scale = 2.0
    config.sample.prompts = (
        "a photo of a t-shirt",
        "a photo of a trouser",
        "a photo of a sneaker",
        "a photo of a bag",
        "a photo of a ankle boot",
    )
    # --mode=eval: samples from text.template filled with each class name in turn, scored by
    # the conditioning CLIP, and by an independent one in eval.clip_dir ('' = none), beside
    # real test images against their true captions; the judge's FD/accuracy when given.
    config.text.class_names = FASHION_MNIST_CLASSES  # in the order of the dataset's labels
    config.text.template = "a photo of a {}"
    config.eval.clip_dir = ""
    config.eval.num_samples = 200 if arg != "tiny" else 8
    config.sample.num = 40 if arg != "tiny" else 4
    config.sample.batch_size = 40 if arg != "tiny" else 4
    if arg == "tiny":
        config.data.image_size = 28
        config.model.channel_mult = (1, 2)
        config.model.attention_resolutions = ()
        config.sample.prompts = ("a photo of a bag", "a photo of a sneaker")
    return config
