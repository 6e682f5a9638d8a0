"""Text-to-image through CLIP (the DLI course's Part 5 recipe), configs/text2img.py.

Training conditions the U-Net on the CLIP *image* embeddings of the training images
(``model.cond_dim`` = the CLIP's projection size), computed once and cached in
``DIR/clip_embeddings_<split>_<digest>.npz``; ``train.p_uncond`` of them are replaced by the
learned null vector. Sampling conditions on the CLIP *text* embeddings of
``sample.prompts`` (CLIP's shared space is what makes this work) with classifier-free
guidance of weight ``sample.guidance_scale``. Embeddings are L2-normalised.

``--mode=eval`` draws ``eval.num_samples`` images from the prompts
``text.template.format(class)`` for the classes ``text.class_names`` in turn and reports
(``clip_report``) their CLIP score against their own prompts and against the same prompts
shuffled among the samples, the same two scores of real test images against their true
captions (the scale of a good match and of none), and how often CLIP's zero-shot choice
among the class prompts is the class asked (samples) or the true class (real images). These
are in the space of the CLIP that conditions; a model can learn to please that CLIP, so
``eval.clip_dir`` adds the same figures in an independent CLIP's space (a CLIP trained with
another seed, say), and ``eval.judge_workdir`` the clean classifier's accuracy and FD: the
stricter tests.
"""

from __future__ import annotations

import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np

from diffax_lab.metrics.clip_score import clip_preprocess, clip_score_of_embeddings
from diffax_lab.models.clip_io import load_clip, load_tokenizer
from diffax_lab.validation import ConfigError


class TextEncoder:
    """A CLIP directory (Hugging Face layout) as image and text embedders."""

    def __init__(self, clip_dir: str, field: str = "config.text.clip_dir"):
        if not clip_dir:
            raise ConfigError(
                f"{field} is empty: give a CLIP directory (Hugging Face layout), "
                "e.g. workdirs/clip/hf_clip from configs/clip.py, or a hub id when online."
            )
        try:
            self.model, self.params, self.config = load_clip(clip_dir)
            self.tokenizer = load_tokenizer(clip_dir)
        except FileNotFoundError as e:
            raise ConfigError(f"{field}={clip_dir!r}: {e}") from e
        self.clip_dir = clip_dir
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


def load_encoder(config) -> TextEncoder:
    """The conditioning CLIP (text.clip_dir), checked against model.cond_dim before anything
    compiles."""
    encoder = TextEncoder(config.text.clip_dir)
    if encoder.dim != config.model.cond_dim:
        raise ConfigError(
            f"config.model.cond_dim={config.model.cond_dim} but the CLIP in "
            f"config.text.clip_dir={config.text.clip_dir!r} embeds in {encoder.dim} "
            "dimensions; set them equal."
        )
    return encoder


def class_prompts(config) -> list[str]:
    """``text.template`` filled with each of ``text.class_names``: the eval prompts."""
    return [config.text.template.format(n) for n in config.text.class_names]


def _mean_sem(v: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error (0 for a single value)."""
    sem = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0
    return float(v.mean()), sem


def clip_report(prompt_emb, fake_emb, fake_y, real_emb, real_y, seed: int = 0) -> dict:
    """CLIP scores and zero-shot agreement of generated and real images.

    prompt_emb [K, D]: the class prompts' text embeddings; fake_emb [N, D] / real_emb [M, D]:
    image embeddings of samples (drawn for classes fake_y) and real images (of classes
    real_y). "Shuffled" pairs each image with the prompt of a random permutation of the
    images' classes. Scores are means over images with their standard errors.
    """
    rng = np.random.default_rng(seed)
    prompt_emb, fake_y, real_y = np.asarray(prompt_emb), np.asarray(fake_y), np.asarray(real_y)

    def scores(img, y):
        return np.asarray(clip_score_of_embeddings(jnp.asarray(img), jnp.asarray(prompt_emb[y])))

    def zero_shot(img):
        img = img / np.linalg.norm(img, axis=-1, keepdims=True)
        txt = prompt_emb / np.linalg.norm(prompt_emb, axis=-1, keepdims=True)
        return np.argmax(img @ txt.T, axis=-1)

    report = {}
    for name, emb, y in (("", fake_emb, fake_y), ("real_", real_emb, real_y)):
        emb = np.asarray(emb)
        for kind, yy in (("", y), ("_shuffled", y[rng.permutation(len(y))])):
            m, sem = _mean_sem(scores(emb, yy))
            report[f"{name}clip_score{kind}"] = m
            report[f"{name}clip_score{kind}_sem"] = sem
        report[f"{name}clip_accuracy"] = float(np.mean(zero_shot(emb) == y))
    report["num_real_clip"] = int(len(real_y))
    return report


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
