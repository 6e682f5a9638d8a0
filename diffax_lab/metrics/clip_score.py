"""The CLIP score (Hessel et al. 2021) of a set of image-caption pairs.

``clip_score`` is torchmetrics' CLIP score (``torchmetrics.functional.multimodal.clip_score``
and ``CLIPScore``): max(100 * mean over pairs of cos(E_image, E_text), 0), the clamp on the
mean. ``per_image_clip_scores`` is 100 * max(cos, 0) for each pair, the clamp on each pair
(Hessel et al.'s CLIP-S, with w = 100 for their 2.5): its mean is not torchmetrics' score,
and is larger whenever a pair's cosine is negative.

``clip_preprocess`` (CLIP's image preprocessing in JAX) lives with the model in
``diffax_lab/models/clip.py`` and is re-exported here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from diffax_lab.models.clip import CLIP_MEAN, CLIP_STD, clip_preprocess  # noqa: F401


def cosine(a, b):
    a = a / jnp.linalg.norm(a, axis=-1, keepdims=True)
    b = b / jnp.linalg.norm(b, axis=-1, keepdims=True)
    return jnp.sum(a * b, axis=-1)


def per_image_clip_scores(image_embeddings, text_embeddings):
    """Per-pair scores [B] of embeddings [B, D] (normalised here): 100 * max(cos, 0), each
    pair clamped. Not torchmetrics' CLIP score of the batch: that is ``clip_score``."""
    return 100.0 * jnp.maximum(cosine(image_embeddings, text_embeddings), 0.0)


def clip_score(image_embeddings, text_embeddings):
    """torchmetrics' CLIP score of the B pairs of embeddings [B, D]: the scalar
    max(100 * mean(cos), 0), the mean over pairs clamped, not each pair (torchmetrics 1.9,
    functional/multimodal/clip_score.py; ``CLIPScore.compute`` over all updates is the same)."""
    score = jnp.mean(100.0 * cosine(image_embeddings, text_embeddings))
    return jnp.maximum(score, 0.0)


@functools.partial(jax.jit, static_argnames=("clip",))
def clip_embeddings(clip, params, images, input_ids, attention_mask):
    """(image [B, D], text [B, D]) CLIP embeddings of images [B, H, W, C] (uint8 or [0, 1])
    and their captions (token ids [B, L] and mask from the CLIP tokenizer)."""
    pixels = clip_preprocess(images, clip.config.vision.image_size)
    img = clip.apply({"params": params}, pixels, method="encode_image")
    txt = clip.apply({"params": params}, input_ids, attention_mask, method="encode_text")
    return img, txt


def clip_scores(clip, params, images, input_ids, attention_mask):
    """Per-pair scores [B] (``per_image_clip_scores``) of images and captions, as in
    ``clip_embeddings``. Their mean is not torchmetrics' score; ``clip_score`` of the
    embeddings is."""
    return per_image_clip_scores(*clip_embeddings(clip, params, images, input_ids, attention_mask))
