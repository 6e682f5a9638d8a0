"""The CLIP task (``config.task = "clip"``, configs/clip.py): the lab's Flax CLIP trained
contrastively on a captioned dataset, saved in Hugging Face's layout.

Captions come from class-name templates (``data/captions.py``): every (class, template)
caption is tokenized once into a table on the device, and each step draws a template per
image. The loss is CLIP's symmetric InfoNCE with a learned temperature (logit scale
clipped at ln 100). The tokenizer is a word-level byte-pair vocabulary in CLIP's format
built from the captions' words, written beside the weights, so the saved directory
(``DIR/hf_clip``: config.json, model.safetensors of the EMA weights, vocab.json,
merges.txt) loads offline wherever a pretrained CLIP does. ``--mode=eval`` reports the
zero-shot accuracy on the test split with "a photo of a {class}" prompts.
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

from diffax_lab.data.captions import FASHION_MNIST_CLASSES, TEMPLATES
from diffax_lab.experiment import Experiment
from diffax_lab.metrics.clip_score import clip_preprocess, cosine
from diffax_lab.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig
from diffax_lab.models.clip_io import load_tokenizer, save_clip

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


def clip_config(c) -> CLIPConfig:
    k = c.clip
    return CLIPConfig(
        text=TextConfig(
            vocab_size=k.vocab_size,
            hidden_size=k.text_width,
            intermediate_size=4 * k.text_width,
            num_hidden_layers=k.text_layers,
            num_attention_heads=k.heads,
            max_position_embeddings=k.context_length,
            eos_token_id=1,
        ),
        vision=VisionConfig(
            hidden_size=k.vision_width,
            intermediate_size=4 * k.vision_width,
            num_hidden_layers=k.vision_layers,
            num_attention_heads=k.heads,
            image_size=c.data.image_size,
            patch_size=k.patch_size,
            num_channels=3,
        ),
        projection_dim=k.projection_dim,
    )


class ClipExperiment(Experiment):
    def build_model(self):
        c = self.config
        self.clip_config = clip_config(c)
        self.model = CLIP(self.clip_config)
        self.class_names = FASHION_MNIST_CLASSES
        self.templates = TEMPLATES
        self.tokenizer_dir = tempfile.mkdtemp(prefix="diffax_clip_tokenizer_")
        texts = [t.format(n) for n in self.class_names for t in self.templates]
        write_word_tokenizer(self.tokenizer_dir, texts)
        self.tokenizer = load_tokenizer(self.tokenizer_dir)
        if len(self.tokenizer) > c.clip.vocab_size:
            raise ValueError(f"clip.vocab_size={c.clip.vocab_size} < {len(self.tokenizer)} tokens.")
        ids, mask = self.tokenize(texts)
        k, t = len(self.class_names), len(self.templates)
        self.caption_ids = ids.reshape(k, t, -1)
        self.caption_mask = mask.reshape(k, t, -1)

    def tokenize(self, texts):
        out = self.tokenizer(
            list(texts),
            padding="max_length",
            max_length=self.config.clip.context_length,
            truncation=True,
            return_tensors="np",
        )
        return jnp.asarray(out["input_ids"], jnp.int32), jnp.asarray(
            out["attention_mask"], jnp.int32
        )

    def init_params(self, key):
        s = self.config.data.image_size
        ids = jnp.zeros((1, self.config.clip.context_length), jnp.int32)
        return self.model.init(key, ids, jnp.zeros((1, s, s, 3)))["params"]

    def pixels(self, x):
        """Images in [-1, 1] (the data pipeline's range) -> CLIP's normalised input."""
        return clip_preprocess((x + 1.0) / 2.0, self.config.data.image_size)

    def train_loss(self, params, x0, labels, keys):
        _, template_key, _ = keys
        which = jax.random.randint(template_key, labels.shape, 0, len(self.templates))
        ids = self.caption_ids[labels, which]
        mask = self.caption_mask[labels, which]
        img = self.model.apply({"params": params}, self.pixels(x0), method="encode_image")
        txt = self.model.apply({"params": params}, ids, mask, method="encode_text")
        img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
        txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
        scale = jnp.exp(jnp.minimum(params["logit_scale"], math.log(100.0)))
        logits = scale * img @ txt.T
        target = jnp.arange(logits.shape[0])
        loss = 0.5 * (
            optax.softmax_cross_entropy_with_integer_labels(logits, target).mean()
            + optax.softmax_cross_entropy_with_integer_labels(logits.T, target).mean()
        )
        # Zero-shot accuracy of the batch against the first template of every class.
        class_txt = self.model.apply(
            {"params": params},
            self.caption_ids[:, 0],
            self.caption_mask[:, 0],
            method="encode_text",
        )
        sims = img @ (class_txt / jnp.linalg.norm(class_txt, axis=-1, keepdims=True)).T
        acc = jnp.mean(jnp.argmax(sims, -1) == labels)
        return loss, {"zero_shot_accuracy": acc, "logit_scale": scale}

    def zero_shot_accuracy(self, params, images_u8, labels, batch_size=500, template=0):
        """Accuracy of argmax_k cos(image, 'a photo of a {class_k}') on uint8 images."""
        ids, mask = self.caption_ids[:, template], self.caption_mask[:, template]

        @jax.jit
        def predict(x):
            img = self.model.apply({"params": params}, self.pixels(x), method="encode_image")
            txt = self.model.apply({"params": params}, ids, mask, method="encode_text")
            return jnp.argmax(cosine(img[:, None], txt[None]), axis=-1)

        preds = []
        for i in range(0, len(images_u8), batch_size):
            x = np.asarray(images_u8[i : i + batch_size], np.float32) / 127.5 - 1.0
            preds.append(np.asarray(predict(x)))
        return float(np.mean(np.concatenate(preds) == labels))

    def export(self, params, path: str) -> str:
        """The Hugging Face layout: config, safetensors weights and the tokenizer files."""
        save_clip(path, self.clip_config, jax.device_get(params))
        self.tokenizer.save_pretrained(path)
        return path
