"""The CLIP score (Hessel et al. 2021) of a set of image-caption pairs.

``clip_score`` is torchmetrics' CLIP score (``torchmetrics.functional.multimodal.clip_score``
and ``CLIPScore``): max(100 * mean over pairs of cos(E_image, E_text), 0), the clamp on the
mean. ``per_image_clip_scores`` is 100 * max(cos, 0) for each pair, the clamp on each pair
(Hessel et al.'s CLIP-S, with w = 100 for their 2.5): its mean is not torchmetrics' score,
and is larger whenever a pair's cosine is negative.

The embeddings come from the model (``diffax_lab/models/clip.py``: ``clip_preprocess``,
``clip_embeddings``), handed in as arrays: this module runs no network.
"""

from __future__ import annotations

import jax.numpy as jnp


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
