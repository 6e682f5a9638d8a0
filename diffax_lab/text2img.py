"""Text-to-image through CLIP (the DLI course's Part 5 recipe), configs/text2img.py.

Training conditions the U-Net on the CLIP *image* embeddings of the training images
(``model.cond_dim`` = the CLIP's projection size), computed once and cached in
``DIR/clip_embeddings_<split>_<digest>.npz``; ``train.p_uncond`` of them are replaced by the
learned null vector. Sampling conditions on the CLIP *text* embeddings of
``sample.prompts`` (CLIP's shared space is what makes this work) with classifier-free
guidance of weight ``sample.guidance_scale``. Embeddings are L2-normalised.
"""

from __future__ import annotations

import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np

from diffax_lab.metrics.clip_score import clip_preprocess
from diffax_lab.models.clip_io import load_clip, load_tokenizer
from diffax_lab.validation import ConfigError


class TextEncoder:
    """A CLIP directory (Hugging Face layout) as image and text embedders."""

    def __init__(self, clip_dir: str):
        if not clip_dir:
            raise ConfigError(
                "config.text.clip_dir is empty: give a CLIP directory (Hugging Face layout), "
                "e.g. workdirs/clip/hf_clip from configs/clip.py, or a hub id when online."
            )
        try:
            self.model, self.params, self.config = load_clip(clip_dir)
            self.tokenizer = load_tokenizer(clip_dir)
        except FileNotFoundError as e:
            raise ConfigError(f"config.text.clip_dir={clip_dir!r}: {e}") from e
        self.dim = self.config.projection_dim
        leaves = jax.tree.leaves(self.params)
        h = hashlib.sha256()
        for x in leaves:
            h.update(np.asarray(x).tobytes())
        self.digest = h.hexdigest()[:12]
        size = self.config.vision.image_size

        @jax.jit
        def images(x_u8):
            pix = clip_preprocess(x_u8, size)
            e = self.model.apply({"params": self.params}, pix, method="encode_image")
            return e / jnp.linalg.norm(e, axis=-1, keepdims=True)

        @jax.jit
        def texts(ids, mask):
            e = self.model.apply({"params": self.params}, ids, mask, method="encode_text")
            return e / jnp.linalg.norm(e, axis=-1, keepdims=True)

        self._images, self._texts = images, texts

    def embed_images(self, images_u8: np.ndarray, batch_size: int = 500) -> np.ndarray:
        return np.concatenate(
            [
                np.asarray(self._images(images_u8[i : i + batch_size]))
                for i in range(0, len(images_u8), batch_size)
            ]
        )

    def embed_texts(self, prompts) -> np.ndarray:
        t = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.config.text.max_position_embeddings,
            truncation=True,
            return_tensors="np",
        )
        return np.asarray(
            self._texts(jnp.asarray(t["input_ids"]), jnp.asarray(t["attention_mask"]))
        )


def cached_image_embeddings(encoder: TextEncoder, images_u8, split: str, workdir: str):
    """CLIP image embeddings of a split, computed once per (CLIP weights, images)."""
    h = hashlib.sha256(np.ascontiguousarray(images_u8).tobytes()).hexdigest()[:12]
    path = os.path.join(workdir, f"clip_embeddings_{split}_{encoder.digest}_{h}.npz")
    if os.path.exists(path):
        with np.load(path) as f:
            return f["embeddings"]
    emb = encoder.embed_images(images_u8)
    if jax.process_index() == 0:
        tmp = path + ".tmp.npz"
        np.savez(tmp, embeddings=emb)
        os.replace(tmp, path)
    return emb
