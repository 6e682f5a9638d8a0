"""A CLIP trained by the lab: Fashion-MNIST images with class-template captions.

Commands:
    python -m diffax_lab.main --config=configs/clip.py --workdir=workdirs/clip
    python -m diffax_lab.main --config=configs/clip.py --workdir=workdirs/clip --mode=eval
Trains the Flax CLIP (diffax_lab/models/clip.py) with CLIP's symmetric InfoNCE and a learned
temperature on 28x28 Fashion-MNIST, captions drawn from five templates ("a photo of a
{class}", ...; diffax_lab/data/captions.py). Writes DIR/hf_clip in Hugging Face's layout
(config.json, model.safetensors, tokenizer.json, tokenizer_config.json), loadable with
diffax_lab.models.clip_io.load_clip like a pretrained CLIP. --mode=eval reports zero-shot
test accuracy with "a photo of a {class}" prompts (docs/BENCHMARKS.md). Variant ``tiny``:
the tests' size.
"""

from ml_collections import ConfigDict

from diffax_lab.config_lib import base


def get_config(arg: str | None = None):
    config = base("ddpm", "tiny" if arg == "tiny" else None)
    config.task = "clip"
    config.model.name = "clip"  # architecture in the clip section; model.dtype is honoured
    config.data.image_size = 28  # native Fashion-MNIST; 7x7 patches of 4 pixels
    config.clip = ConfigDict()
    k = config.clip
    k.vocab_size = 256  # the word-level tokenizer's vocabulary must fit
    k.context_length = 16
    k.text_width = 64
    k.text_layers = 2
    k.vision_width = 64
    k.vision_layers = 3
    k.heads = 4
    k.patch_size = 4
    k.projection_dim = 64
    o = config.optim
    o.lr = 1e-3
    o.warmup_steps = 200
    o.lr_schedule = "cosine"
    o.weight_decay = 0.1
    o.ema_decay = 0.99
    t = config.train
    t.batch_size = 128
    t.num_steps = 1500
    t.checkpoint_every = 500
    t.sample_every = 0
    t.log_every = 100
    config.eval.num_examples = 10_000
    config.eval.batch_size = 500
    if arg == "tiny":
        k.text_width = k.vision_width = k.projection_dim = 16
        k.text_layers = k.vision_layers = 1
        t.batch_size = 16
        t.num_steps = 4
        t.log_every = 2
        config.eval.num_examples = 32
        config.eval.batch_size = 16
    elif arg not in (None, ""):
        raise ValueError(f"Unknown variant {arg!r} of configs/clip.py; choose '' or 'tiny'.")
    return config
