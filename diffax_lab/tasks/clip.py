"""The CLIP task (``config.task = "clip"``, configs/clip.py): the lab's Flax CLIP trained
contrastively on a captioned dataset, saved in Hugging Face's layout.

Captions come from class-name templates (``data/captions.py``): every (class, template)
caption is tokenized once into a table on the device, and each step draws a template per
image. The loss is CLIP's symmetric InfoNCE with a learned temperature (logit scale
clipped at ln 100). The tokenizer is a word-level byte-pair vocabulary in CLIP's format
built from the captions' words, written beside the weights, so the saved directory
(``DIR/hf_clip``: config.json, model.safetensors of the EMA weights, vocab.json,
merges.txt) loads offline wherever a pretrained CLIP does. The CLIP computes in
``model.dtype``. Evaluation (evaluator ``zero_shot``): zero-shot accuracy on the test split
with "a photo of a {class}" prompts.
"""

from __future__ import annotations

import json
import math
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from diffax_lab.config_lib import check_number
from diffax_lab.data.captions import FASHION_MNIST_CLASSES, TEMPLATES
from diffax_lab.errors import ConfigError
from diffax_lab.models import clip_config, get_model
from diffax_lab.models.clip import clip_preprocess
from diffax_lab.models.clip_io import load_tokenizer, save_clip, tokenize
from diffax_lab.tasks.base import Task, predict_in_batches
from diffax_lab.tasks.registry import register

SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def write_word_tokenizer(path: str, texts) -> None:
    """vocab.json + merges.txt of a CLIP-format BPE that spells every word of ``texts``
    as one token (merges built left to right), with single characters as fallback."""
    words = sorted({w for t in texts for w in t.lower().split()})
    vocab: dict[str, int] = {s: i for i, s in enumerate(SPECIALS)}
    merges: list[str] = []

    def add(tok):
        if tok not in vocab:
            vocab[tok] = len(vocab)

    for ch in sorted({c for w in words for c in w}):
        add(ch)
        add(ch + "</w>")
    for w in words:
        pieces = [*w[:-1], w[-1] + "</w>"]
        cur = pieces[0]
        for nxt in pieces[1:]:
            merge = f"{cur} {nxt}"
            if merge not in merges:
                merges.append(merge)
            cur = cur + nxt
            add(cur)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {
        "bos_token": SPECIALS[0],
        "eos_token": SPECIALS[1],
        "pad_token": SPECIALS[1],
        "unk_token": SPECIALS[1],
    }
    with open(os.path.join(path, "special_tokens_map.json"), "w") as f:
        json.dump(special, f)


@register
class ClipTask(Task):
    name = "clip"
    section = "clip"
    section_hint = "see configs/clip.py"
    metrics = ("zero_shot",)

    @classmethod
    def check_config(cls, config) -> None:
        super().check_config(config)
        for f in (
            "vocab_size",
            "context_length",
            "text_width",
            "text_layers",
            "vision_width",
            "vision_layers",
            "heads",
            "patch_size",
            "projection_dim",
        ):
            check_number(config, "clip." + f, low=1, integer=True)
        k = config.clip
        for f in ("text_width", "vision_width"):
            if k[f] % k.heads:
                raise ConfigError(f"config.clip.heads={k.heads} must divide clip.{f}={k[f]}.")
        if config.data.image_size % k.patch_size:
            raise ConfigError(
                f"config.clip.patch_size={k.patch_size} must divide data.image_size="
                f"{config.data.image_size}."
            )

    def build(self):
        c = self.config
        self.clip_config = clip_config(c)
        self.model = get_model(c)
        self.class_names = FASHION_MNIST_CLASSES
        self.templates = TEMPLATES
        self.tokenizer_dir = tempfile.mkdtemp(prefix="diffax_clip_tokenizer_")
        texts = [t.format(n) for n in self.class_names for t in self.templates]
        write_word_tokenizer(self.tokenizer_dir, texts)
        self.tokenizer = load_tokenizer(self.tokenizer_dir)
        if len(self.tokenizer) > c.clip.vocab_size:
            raise ConfigError(
                f"config.clip.vocab_size={c.clip.vocab_size} < the tokenizer's "
                f"{len(self.tokenizer)} tokens; raise it."
            )
        ids, mask = self.tokenize(texts)
        k, t = len(self.class_names), len(self.templates)
        self.caption_ids = ids.reshape(k, t, -1)
        self.caption_mask = mask.reshape(k, t, -1)

    def tokenize(self, texts):
        ids, mask = tokenize(self.tokenizer, texts, self.config.clip.context_length)
        return jnp.asarray(ids), jnp.asarray(mask)

    def init_params(self, key):
        s = self.config.data.image_size
        ids = jnp.zeros((1, self.config.clip.context_length), jnp.int32)
        return self.model.init(key, ids, jnp.zeros((1, s, s, 3)))["params"]

    def pixels(self, x):
        """Images in [-1, 1] (the data pipeline's range) -> CLIP's normalised input."""
        return clip_preprocess((x + 1.0) / 2.0, self.config.data.image_size)

    def encode_images(self, params, x):
        """L2-normalised float32 embeddings of images in [-1, 1]."""
        e = self.model.apply({"params": params}, self.pixels(x), method="encode_image")
        e = e.astype(jnp.float32)
        return e / jnp.linalg.norm(e, axis=-1, keepdims=True)

    def encode_texts(self, params, ids, mask):
        """L2-normalised float32 embeddings of token ids."""
        e = self.model.apply({"params": params}, ids, mask, method="encode_text")
        e = e.astype(jnp.float32)
        return e / jnp.linalg.norm(e, axis=-1, keepdims=True)

    def train_loss(self, params, x0, labels, keys):
        _, template_key, _ = keys
        which = jax.random.randint(template_key, labels.shape, 0, len(self.templates))
        ids = self.caption_ids[labels, which]
        mask = self.caption_mask[labels, which]
        img, txt = self.encode_images(params, x0), self.encode_texts(params, ids, mask)
        scale = jnp.exp(jnp.minimum(params["logit_scale"], math.log(100.0)))
        logits = scale * img @ txt.T
        target = jnp.arange(logits.shape[0])
        loss = 0.5 * (
            optax.softmax_cross_entropy_with_integer_labels(logits, target).mean()
            + optax.softmax_cross_entropy_with_integer_labels(logits.T, target).mean()
        )
        # Zero-shot accuracy of the batch against the first template of every class.
        class_txt = self.encode_texts(params, self.caption_ids[:, 0], self.caption_mask[:, 0])
        acc = jnp.mean(jnp.argmax(img @ class_txt.T, -1) == labels)
        return loss, {"zero_shot_accuracy": acc, "logit_scale": scale}

    def zero_shot_accuracy(self, params, images_u8, labels, batch_size=500, template=0):
        """Accuracy of argmax_k cos(image, 'a photo of a {class_k}') on uint8 images."""
        ids, mask = self.caption_ids[:, template], self.caption_mask[:, template]

        @jax.jit
        def predict(x):
            img, txt = self.encode_images(params, x), self.encode_texts(params, ids, mask)
            return jnp.argmax(img @ txt.T, axis=-1)

        preds = predict_in_batches(predict, images_u8, batch_size)
        return float(np.mean(preds == labels))

    def export(self, params, workdir: str) -> str:
        """DIR/hf_clip in the Hugging Face layout: config, safetensors weights, tokenizer."""
        path = os.path.join(workdir, "hf_clip")
        save_clip(path, self.clip_config, jax.device_get(params))
        self.tokenizer.save_pretrained(path)
        logging.info("Wrote the CLIP (EMA weights, Hugging Face layout) to %s.", path)
        return path
