"""Text-to-image through CLIP (``config.task = "text2img"``; the DLI course's Part 5
recipe, configs/text2img.py).

Training conditions the U-Net on the CLIP *image* embeddings of the training images
(``model.cond_dim`` = the CLIP's projection size), computed once and cached in
``DIR/clip_embeddings_<split>_<digest>.npz``; ``train.p_uncond`` of them are replaced by the
learned null vector. Sampling conditions on the CLIP *text* embeddings of
``sample.prompts`` (CLIP's shared space is what makes this work) with classifier-free
guidance of weight ``sample.guidance_scale``. Embeddings are L2-normalised. The CLIPs
compute in ``model.dtype``.

``text.conditioning = "tokens"`` (Stable Diffusion's way; configs/ldm_text2img.py): the U-Net
(``model.cross_attention_dim`` = the CLIP text encoder's width) cross-attends to the text
encoder's token sequence (last hidden states, padding masked;
``diffax_lab/models/text_context.py``). Training needs text, so each training image gets a
caption, a template of ``data/captions.py`` filled with its class name (drawn per image, as
configs/clip.py trains the CLIP); the null condition of CFG is the empty prompt's sequence.
Conditions are indices into a table of the distinct prompts' sequences (built once in
``load_resources``). ``"pooled"`` (the default) is the image-embedding recipe above.

``--mode=eval`` (evaluator ``clip_score``) draws ``eval.num_samples`` images from the
prompts ``text.template.format(class)`` for the classes ``text.class_names`` in turn and
scores them in the conditioning CLIP's space and, with ``eval.clip_dir``, in an
independent CLIP's (see diffax_lab/evaluators/clip_score.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from diffax_lab import images
from diffax_lab.config_lib import check_number
from diffax_lab.data import load_split, pipeline
from diffax_lab.data.captions import TEMPLATES, class_captions
from diffax_lab.errors import ConfigError
from diffax_lab.metrics.features import reference_features
from diffax_lab.models import compute_dtype
from diffax_lab.models.text_context import (
    ClipEmbedder,
    TokenConditioning,
    TokenEncoder,
    build_token_table,
    check_class_prompts,
    check_text_conditioning,
    conditional_view,
)
from diffax_lab.tasks.denoising import DenoisingTask
from diffax_lab.tasks.registry import register


@register
class Text2ImgTask(TokenConditioning, DenoisingTask):
    name = "text2img"
    metrics = ("loss", "clip_score", "fd", "kid", "pr", "bpd")

    @classmethod
    def check_config(cls, config) -> None:
        if config.eval.get("every_steps", 0):
            raise ConfigError(
                "config.eval.every_steps must be 0 for a text-conditional model; evaluate "
                "its checkpoints with --mode=eval."
            )
        if "text" not in config:
            raise ConfigError(
                "config.task='text2img' conditions on CLIP embeddings: it needs a config.text "
                "section with clip_dir (see configs/text2img.py)."
            )
        if check_text_conditioning(config) == "pooled":
            check_number(config, "model.cond_dim", low=1, integer=True)
        super().check_config(conditional_view(config))
        if config.model.num_classes:
            raise ConfigError("config.model.num_classes must be 0 for text2img (it uses text).")
        prompts = tuple(config.sample.get("prompts", ()))
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ConfigError(
                "A text-conditional model (model.cond_dim > 0) samples from "
                "config.sample.prompts: give a list of non-empty strings."
            )
        if config.train.sample_every:
            raise ConfigError(
                "config.train.sample_every must be 0 for a text-conditional model; draw its "
                "prompt grid with --mode=sample."
            )
        if config.sample.classifier_scale > 0:
            raise ConfigError("config.sample.classifier_scale must be 0 for text2img.")
        check_class_prompts(config)

    def default_metrics(self):
        return ("loss", "clip_score", *super().default_metrics()[1:])

    @property
    def tokens(self) -> bool:
        """Cross-attention to token sequences (else the pooled embedding vector)."""
        return self.config.text.get("conditioning", "pooled") == "tokens"

    # ----- CLIPs -----
    def load_resources(self, workdir: str, mode: str) -> None:
        """The conditioning CLIP (and for eval the independent one), checked before anything
        compiles."""
        c = self.config
        self.encoder = ClipEmbedder(c.text.clip_dir, dtype=compute_dtype(c))
        if self.tokens:
            enc = TokenEncoder(c.text.clip_dir, dtype=compute_dtype(c))
            self.token_table = build_token_table(c, enc, TEMPLATES)
        elif self.encoder.dim != c.model.cond_dim:
            raise ConfigError(
                f"config.model.cond_dim={c.model.cond_dim} but the CLIP in "
                f"config.text.clip_dir={c.text.clip_dir!r} embeds in {self.encoder.dim} "
                "dimensions; set them equal."
            )
        other = c.eval.get("clip_dir", "")
        self.independent_encoder = (
            ClipEmbedder(other, "config.eval.clip_dir", compute_dtype(c))
            if mode == "eval" and other
            else None
        )

    def image_embeddings(self, encoder, images_u8, split: str, workdir: str):
        """CLIP image embeddings of a split, computed once per (CLIP weights, images)."""
        emb, _ = reference_features(
            encoder, self.config.data, split, images_u8, workdir, f"clip_embeddings_{split}"
        )
        return emb

    def train_data(self, workdir: str):
        imgs, labels = self.load_train_split()
        if self.tokens:  # a caption per image: a template drawn per image with its class
            t = self.config.text
            caps = class_captions(labels, tuple(t.class_names), TEMPLATES, self.config.seed)
            return imgs, self.token_table.index(caps)
        return imgs, self.image_embeddings(self.encoder, imgs, "train", workdir)

    def eval_conditions(self, labels, workdir: str):
        """The CLIP image embedding of each test image itself (as in training); with tokens
        its class prompt (text.template)."""
        if self.tokens:
            return np.asarray(labels, np.int32)  # class prompts are the table's first rows
        test = load_split(self.config.data, "test")[0]
        return self.image_embeddings(self.encoder, test, "test", workdir)[: len(labels)]

    def class_prompts(self) -> list[str]:
        """``text.template`` filled with each of ``text.class_names``: the eval prompts."""
        t = self.config.text
        return [t.template.format(n) for n in t.class_names]

    # ----- conditioning -----
    @property
    def uses_condition(self) -> bool:
        return True

    def prompt_conditions(self, prompts) -> np.ndarray:
        """The conditions of prompts: table indices (tokens) or CLIP text embeddings."""
        if self.tokens:
            return self.token_table.index(list(prompts))
        return self.encoder.embed_texts(list(prompts))

    def init_params(self, key):
        if not self.tokens:
            return super().init_params(key)
        x = jnp.zeros((1, *self.image_shape))
        return self.model.init(key, x, jnp.zeros((1,)), **self.context_inputs())["params"]

    def condition_kwargs(self, cond, train=False, key=None):
        if self.tokens:
            return TokenConditioning.condition_kwargs(self, cond, train, key)
        on = jnp.ones(cond.shape[:1], bool)
        if train:
            on = ~jax.random.bernoulli(key, self.config.train.p_uncond, cond.shape[:1])
        return {"cond": cond, "cond_mask": on}

    def uncond_kwargs(self, cond):
        if self.tokens:
            return TokenConditioning.uncond_kwargs(self, cond)
        return {"cond": cond, "cond_mask": jnp.zeros(cond.shape[:1], bool)}

    def sample_conditions(self, num, labels=None):
        if labels is None:  # the prompts of sample.prompts, in turn
            labels = self.prompt_conditions(self.config.sample.prompts)
        return np.asarray(labels, np.int32 if self.tokens else np.float32)

    def requested_labels(self, n):
        return np.arange(n) % len(self.config.text.class_names)

    def eval_samples(self, params, num, key):
        """Samples from the class prompts in turn (the class asked is known)."""
        prompts = self.class_prompts()
        samples, _, _ = self.generate(params, num, key, labels=self.prompt_conditions(prompts))
        info = {**self.sampling_info(), "prompt_template": self.config.text.template}
        return np.asarray(pipeline.to_uint8(samples)), self.requested_labels(num), info

    def sample(self, params, workdir, step, key, labels=None):
        """The grid of the diffusion task with one row per prompt (its caption beside it)."""
        prompts = list(self.config.sample.prompts)
        per = max(1, self.config.sample.num // len(prompts))
        emb = np.repeat(self.prompt_conditions(prompts), per, axis=0)
        out = super().sample(params, workdir, step, key, labels=emb)
        rows = [out["samples"][i * per : (i + 1) * per] for i in range(len(prompts))]
        rows = [r for r in rows if len(r) == per]
        path = out["grid"].replace(".png", "_prompts.png")
        images.save_labelled_rows(path, rows, prompts[: len(rows)])
        logging.info(
            "Wrote the prompt grid (w = %g) to %s.", self.config.sample.guidance_scale, path
        )
        return {**out, "prompt_grid": path}
