"""The unCLIP prior (``config.task = "prior"``; DALL-E 2, Ramesh et al. 2022, section 2.1):
a diffusion model over CLIP *image* embeddings conditioned on the CLIP *text* embedding
of the image's caption, so that text -> prior -> image embedding -> decoder. The decoder
is the text2img task (tasks/text2img.py), which is trained on CLIP image embeddings
already; the cascade task (tasks/cascade.py, ``cascade.prior_workdir``) chains them.

Training pairs: the CLIP image embedding of each training image (cached in the workdir)
and the CLIP text embedding of a caption of it (``text.template``-like captions of its
class from ``data/captions.py``, one template drawn per image). The network
(``models/prior.py``) predicts the clean embedding (``diffusion.prediction = "x0"``, as
DALL-E 2), with the text dropped at rate ``train.p_uncond`` for classifier-free guidance
(``sample.guidance_scale``). Embeddings are L2-normalised; samples are normalised again.

``--mode=sample`` writes DIR/samples/prior_<stem>.npz (the drawn embeddings for
``sample.prompts``) and logs their mean cosine to their own prompts' embeddings and to
the shuffled ones. ``--mode=eval``: the held-out loss on the test split's pairs.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from diffax_lab.config_lib import check_number
from diffax_lab.data import load_split
from diffax_lab.data.captions import TEMPLATES, class_captions
from diffax_lab.errors import ConfigError
from diffax_lab.metrics.features import reference_features
from diffax_lab.models.prior import PriorMLP
from diffax_lab.models.text_context import ClipEmbedder
from diffax_lab.tasks.denoising import DenoisingTask
from diffax_lab.tasks.registry import register


def normalise(x):
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@register
class PriorTask(DenoisingTask):
    name = "prior"
    metrics = ("loss",)

    @classmethod
    def check_config(cls, config) -> None:
        for section in ("prior", "text"):
            if section not in config:
                raise ConfigError(
                    f"config.task='prior' needs a config.{section} section: see configs/prior.py."
                )
        super().check_config(config)
        check_number(config, "prior.dim", low=1, integer=True)
        check_number(config, "prior.width", low=1, integer=True)
        check_number(config, "prior.depth", low=0, integer=True)
        if config.model.cond_dim != config.prior.dim:
            raise ConfigError(
                f"config.model.cond_dim={config.model.cond_dim} must equal config.prior.dim="
                f"{config.prior.dim} (text and image embeddings share CLIP's space)."
            )
        if config.model.num_classes:
            raise ConfigError("config.model.num_classes must be 0 for the prior.")
        if config.train.sample_every or config.eval.get("every_steps", 0):
            raise ConfigError(
                "config.train.sample_every and eval.every_steps must be 0 for the prior."
            )
        names = tuple(config.text.get("class_names", ()))
        if not names:
            raise ConfigError("config.text.class_names: the classes the captions name.")
        if not tuple(config.sample.get("prompts", ())):
            raise ConfigError("config.sample.prompts: the texts --mode=sample draws for.")

    def build(self):
        super().build()
        p = self.config.prior
        self.image_shape = (p.dim,)  # the diffusion runs over embedding vectors
        self.model = PriorMLP(dim=p.dim, width=p.width, depth=p.depth)
        self.encoder = None

    def default_metrics(self):
        return ("loss",)

    normalise = staticmethod(normalise)

    # ----- data: (image embedding, caption embedding) pairs -----
    def load_resources(self, workdir: str, mode: str) -> None:
        self.workdir = workdir  # where the embeddings are cached
        self.encoder = ClipEmbedder(self.config.text.clip_dir)
        if self.encoder.dim != self.config.prior.dim:
            raise ConfigError(
                f"config.prior.dim={self.config.prior.dim} but the CLIP in "
                f"config.text.clip_dir embeds in {self.encoder.dim} dimensions."
            )

    def captions(self, labels, seed: int) -> list[str]:
        return class_captions(labels, tuple(self.config.text.class_names), TEMPLATES, seed)

    def pairs(self, split: str, workdir: str):
        imgs, labels = load_split(self.config.data, split)
        emb, _ = reference_features(
            self.encoder, self.config.data, split, imgs, workdir, f"clip_embeddings_{split}"
        )
        text = self.encoder.embed_texts(self.captions(labels, self.config.seed))
        return np.asarray(emb, np.float32), text, labels

    def train_data(self, workdir: str):
        emb, text, _ = self.pairs("train", workdir)
        if self.config.train.batch_size > len(emb):
            raise ConfigError(
                f"config.train.batch_size={self.config.train.batch_size} exceeds the "
                f"{len(emb)} training pairs."
            )
        return emb, text

    def model_input(self, emb, text, key):
        return emb, text  # embeddings as they are (no pixels, no flips)

    @property
    def uses_condition(self) -> bool:
        return True

    def condition_kwargs(self, cond, train=False, key=None):
        on = jnp.ones(cond.shape[:1], bool)
        if train and self.config.train.p_uncond > 0:
            on = ~jax.random.bernoulli(key, self.config.train.p_uncond, cond.shape[:1])
        return {"cond": cond, "cond_mask": on}

    def uncond_kwargs(self, cond):
        if self.config.train.p_uncond == 0:
            return None
        return {"cond": cond, "cond_mask": jnp.zeros(cond.shape[:1], bool)}

    def sample_conditions(self, num, labels=None):
        if labels is None:
            labels = self.encoder.embed_texts(list(self.config.sample.prompts))
        return np.asarray(labels, np.float32)

    def requested_labels(self, n):
        return None

    def init_params(self, key):
        d = self.config.prior.dim
        z = jnp.zeros((1, d))
        return self.model.init(key, z, jnp.zeros((1,)), cond=z)["params"]

    # ----- evaluation: the held-out loss on test pairs -----
    def test_batches(self):
        emb, text, labels = self.pairs("test", self.workdir)
        e = self.config.eval
        n = min(e.num_examples, len(emb))
        bs = min(e.batch_size, n)
        n = n // bs * bs
        self._test_text = text[:n]
        return emb[:n], np.arange(n), bs

    def eval_conditions(self, labels, workdir: str):
        return self._test_text[np.asarray(labels)]

    def eval_loss(self, params, x, cond, key):
        return self.loss_fn(self.model_fn(params, cond), jnp.asarray(x, jnp.float32), key)

    # ----- sampling -----
    def sample(self, params, workdir, step, key, labels=None):
        prompts = list(self.config.sample.prompts)
        text = self.encoder.embed_texts(prompts)
        out, _, _ = self.generate(params, len(prompts), key, labels=text)
        emb = normalise(out)
        cos = emb @ text.T
        own = float(np.mean(np.diag(cos)))
        other = float((cos.sum() - np.trace(cos)) / max(cos.size - len(cos), 1))
        path = os.path.join(workdir, "samples", f"prior_{self.sample_stem(step)}.npz")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if jax.process_index() == 0:
            np.savez_compressed(path, embeddings=emb, text_embeddings=text, prompts=prompts)
        logging.info(
            "Prior samples for %d prompts: cosine to own text %.3f, to other prompts %.3f; %s.",
            len(prompts),
            own,
            other,
            path,
        )
        return {"step": step, "npz": path, "samples": emb, "cos_own": own, "cos_other": other}
