"""Text-to-image latent diffusion on Fashion-MNIST, Stable Diffusion's way: the U-Net of
configs/ldm.py on the 8x8x4 latents of configs/vae.py, conditioned by cross-attention to the
token sequence of the lab's CLIP text encoder (configs/clip.py), classifier-free guidance with
the empty prompt as the null condition.

Commands (the autoencoder and the CLIP first):
    python -m diffax_lab.main --config=configs/vae.py --workdir=workdirs/vae
    python -m diffax_lab.main --config=configs/clip.py --workdir=workdirs/clip
    python -m diffax_lab.main --config=configs/ldm_text2img.py --workdir=workdirs/ldm_t2i
    python -m diffax_lab.main --workdir=workdirs/ldm_t2i --mode=sample   # a row per class prompt
    python -m diffax_lab.main --workdir=workdirs/ldm_t2i --mode=eval \
        --config.eval.judge_workdir=workdirs/clean   # fd/kid/pr, judge accuracy of the prompts
Each training image is captioned with one of the five templates of data/captions.py and its
class name (drawn per image, as the CLIP was trained); 10% of captions are replaced by "" at
training time. Every attention block of the U-Net is a spatial transformer (self-attention,
cross-attention to the CLIP's last hidden states with padding masked, GEGLU feed-forward;
diffax_lab/models/transformer.py); model.cross_attention_dim must equal the CLIP text
encoder's width (64 for configs/clip.py). Samples and evaluation ask for the prompts
text.template.format(class) in class order; sample.guidance_scale = w.
For the same conditioning on pixels: configs/text2img.py with --config.text.conditioning=tokens
--config.model.cond_dim=0 --config.model.cross_attention_dim=64.
Variants: ``tiny`` (the tests' size: configs/clip.py:tiny's 16-wide CLIP), ``cpu`` (sized
for 2 CPU cores; latent.autoencoder from configs/vae.py:cpu).
Device, time and result: the default is sized for one GPU (its 20k steps: not yet run).
notebooks/06_latent_diffusion.py trains ``cpu`` for 4 minutes on the idle 2-core CPU
(2026-12-05; 1.0M parameters, 1717 steps at batch 64, model.num_res_blocks=1,
optim.lr=5e-4, warm-up 100, EMA 0.99, on its 600-step CLIP) beside the pooled-embedding
pixel model of configs/text2img.py trained as long (360 steps): CLIP score of 500 samples
(w = 2, DDIM 50) against their own prompt 61.0 vs 21.7 shuffled, against 44.3 vs 26.3 for
the pixel model (real test images: 64.8 vs 17.4; docs/BENCHMARKS.md "Latent diffusion").
The CLIP score of a token-conditioned latent model is computed in the notebook
(clip_report of evaluators/clip_score.py on the conditioning CLIP); --mode=eval of this
task offers loss and fd/kid/pr, not clip_score.
"""

from ml_collections import ConfigDict

from diffax_lab.config_lib import base
from diffax_lab.data.captions import FASHION_MNIST_CLASSES


def get_config(arg: str | None = None):
    if arg not in (None, "", "tiny", "cpu"):
        raise ValueError(
            f"Unknown variant {arg!r} of configs/ldm_text2img.py; choose '', 'tiny' or 'cpu'."
        )
    config = base("ldm", arg)
    config.model.num_classes = 0  # the class enters as its caption's tokens
    config.model.cond_dim = 0
    config.model.cross_attention_dim = 16 if arg == "tiny" else 64  # the CLIP's text width
    config.model.transformer_depth = 1
    config.text = ConfigDict()
    config.text.conditioning = "tokens"
    config.text.clip_dir = "workdirs/clip/hf_clip"
    config.text.class_names = FASHION_MNIST_CLASSES  # in the order of the dataset's labels
    config.text.template = "a photo of a {}"  # the prompts of samples and evaluation
    config.train.p_uncond = 0.1
    config.sample.guidance_scale = 2.0
    config.sample.labels = ()  # samples ask for every class prompt in turn
    if arg == "tiny":
        config.model.attention_resolutions = (4,)  # one spatial transformer level
    return config
