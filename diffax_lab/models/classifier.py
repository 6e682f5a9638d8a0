"""A noise-conditioned image classifier: the encoder half of the U-Net, pooled (Dhariwal &
Nichol 2021, section 4.1), Flax Linen, NHWC.

``Classifier(...).apply(params, x, t, train=False) -> logits [B, num_classes]``
- ``x`` [B, H, W, C] images in [-1, 1], noised to time ``t`` (x_t) or clean (t = 0);
- ``t`` [B] continuous time in [0, 1], embedded like the U-Net's (``time_scale * t``).
``return_features=True`` returns ``(logits, features)``: the pooled penultimate activations
[B, F] that evaluation uses as a feature space.

Trained on x_t for all t it gives log p(y | x_t) for classifier guidance; trained with t fixed
at 0 it is the clean classifier that judges samples. Not for: the noising (the training task
samples x_t) or the guidance maths (``diffusion/guidance.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from diffax_lab.models.layers import (
    ACTIVATIONS,
    AttentionBlock,
    Downsample,
    GroupNorm,
    ResBlock,
    sinusoidal_embedding,
)


class Classifier(nn.Module):
    num_classes: int = 10
    base_channels: int = 32
    channel_mult: Sequence[int] = (1, 2, 2)
    num_res_blocks: int = 1
    attention_resolutions: Sequence[int] = ()
    attention_heads: int = 1
    dropout: float = 0.0
    num_groups: int = 8
    activation: str = "silu"
    downsample: str = "conv"
    time_scale: float = 1000.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, t, *, train: bool = False, return_features: bool = False):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"model.activation must be one of {sorted(ACTIVATIONS)}.")
        act = ACTIVATIONS[self.activation]
        dt = self.dtype
        emb_dim = 4 * self.base_channels
        emb = sinusoidal_embedding(self.time_scale * t, self.base_channels)
        emb = nn.Dense(emb_dim, dtype=dt, name="time_dense0")(emb)
        emb = nn.Dense(emb_dim, dtype=dt, name="time_dense1")(act(emb))

        h = nn.Conv(self.base_channels, (3, 3), dtype=dt, name="conv_in")(x.astype(dt))
        for level, mult in enumerate(self.channel_mult):
            for i in range(self.num_res_blocks):
                h = ResBlock(
                    self.base_channels * mult,
                    self.num_groups,
                    self.dropout,
                    self.activation,
                    dt,
                    name=f"down{level}_res{i}",
                )(h, emb, train=train)
                if h.shape[1] in self.attention_resolutions:
                    h = AttentionBlock(
                        self.attention_heads, self.num_groups, dt, name=f"down{level}_attn{i}"
                    )(h)
            if level != len(self.channel_mult) - 1:
                h = Downsample(h.shape[-1], self.downsample, dt, name=f"down{level}_downsample")(h)
        h = ResBlock(
            h.shape[-1], self.num_groups, self.dropout, self.activation, dt, name="mid_res0"
        )(h, emb, train=train)
        h = act(GroupNorm(self.num_groups, dt, name="norm_out")(h))
        features = jnp.mean(h.astype(jnp.float32), axis=(1, 2))  # global average pool
        logits = nn.Dense(self.num_classes, name="head")(features)
        return (logits, features) if return_features else logits
