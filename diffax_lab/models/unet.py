"""The configurable diffusion U-Net (Ho et al. 2020, App. B), NHWC, Flax Linen.

``UNet(...).apply(params, x, t, y=None, cond=None, cond_mask=None, train=False, rngs=...)``
- ``x`` [B, H, W, C] noised images; H and W must divide by 2^(len(channel_mult) - 1).
- ``t`` [B] continuous time in [0, 1]; embedded as ``time_scale * t`` (the DDPM step index).
- ``y`` [B] int class labels in [0, num_classes]; ``num_classes`` itself is the learned null
  token that classifier-free guidance trains and samples with.
- ``cond`` [B, cond_dim] a vector condition (a CLIP embedding, say); rows where
  ``cond_mask`` is False are replaced by a learned null vector.

Not for: schedules or losses: the network knows nothing of the diffusion process.
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
    Upsample,
    sinusoidal_embedding,
)

TIME_EMBEDDINGS = ("sinusoidal", "channel")


class UNet(nn.Module):
    out_channels: int = 3
    base_channels: int = 128
    channel_mult: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: Sequence[int] = (16,)  # feature-map sizes (H) that get attention
    attention_heads: int = 1
    dropout: float = 0.0
    num_groups: int = 32
    activation: str = "silu"
    time_embedding: str = "sinusoidal"  # or "channel": t as an extra constant input channel
    time_scale: float = 1000.0
    downsample: str = "conv"
    upsample: str = "nearest"
    upsample_kernel: int = 3  # for upsample="transpose" (PyTorch ConvTranspose2d semantics)
    upsample_padding: int = 1
    upsample_output_padding: int = 1
    num_classes: int = 0  # 0: no class conditioning
    cond_dim: int = 0  # 0: no vector conditioning
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32

    @nn.compact
    def __call__(self, x, t, y=None, cond=None, cond_mask=None, *, train: bool = False):
        b, h, w, _ = x.shape
        factor = 2 ** (len(self.channel_mult) - 1)
        if h % factor or w % factor:
            raise ValueError(
                f"Input {h}x{w} does not divide by {factor} (2^(len(model.channel_mult) - 1) = "
                f"2^{len(self.channel_mult) - 1}); pad the data (data.image_size) to a multiple "
                f"of {factor} or use fewer levels."
            )
        for ch in [self.base_channels * m for m in self.channel_mult]:
            if ch % self.num_groups:
                raise ValueError(
                    f"model.num_groups={self.num_groups} must divide every level's "
                    f"channels; {ch} is not a multiple."
                )
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"model.activation must be one of {sorted(ACTIVATIONS)}.")
        act = ACTIVATIONS[self.activation]
        emb_dim = 4 * self.base_channels
        dt = self.dtype

        emb = None
        if self.time_embedding == "sinusoidal":
            emb = sinusoidal_embedding(self.time_scale * t, self.base_channels)
            emb = nn.Dense(emb_dim, dtype=dt, name="time_dense0")(emb)
            emb = nn.Dense(emb_dim, dtype=dt, name="time_dense1")(act(emb))
        elif self.time_embedding == "channel":
            # The course's simplest conditioning: t as one more image channel.
            x = jnp.concatenate([x, jnp.broadcast_to(t[:, None, None, None], (b, h, w, 1))], -1)
        else:
            raise ValueError(f"model.time_embedding must be one of {TIME_EMBEDDINGS}.")

        def add(emb, extra):
            return extra if emb is None else emb + extra

        if self.num_classes:
            if y is None:
                raise ValueError(
                    "This U-Net is class-conditional: pass labels y "
                    f"(the null label is {self.num_classes})."
                )
            table = nn.Embed(self.num_classes + 1, emb_dim, name="class_embed")
            emb = add(emb, table(y).astype(dt))
        if self.cond_dim:
            if cond is None:
                raise ValueError(f"This U-Net takes a [B, {self.cond_dim}] vector condition.")
            null = self.param("cond_null", nn.initializers.normal(0.02), (self.cond_dim,))
            if cond_mask is not None:
                cond = jnp.where(cond_mask[:, None], cond, null[None, :])
            emb = add(emb, nn.Dense(emb_dim, dtype=dt, name="cond_proj")(cond.astype(dt)))

        def res(features, name):
            return ResBlock(features, self.num_groups, self.dropout, self.activation, dt, name=name)

        def attn(name):
            return AttentionBlock(self.attention_heads, self.num_groups, dt, name=name)

        hs = [nn.Conv(self.base_channels, (3, 3), dtype=dt, name="conv_in")(x.astype(dt))]
        for level, mult in enumerate(self.channel_mult):
            for i in range(self.num_res_blocks):
                hcur = res(self.base_channels * mult, f"down{level}_res{i}")(
                    hs[-1], emb, train=train
                )
                if hcur.shape[1] in self.attention_resolutions:
                    hcur = attn(f"down{level}_attn{i}")(hcur)
                hs.append(hcur)
            if level != len(self.channel_mult) - 1:
                hs.append(
                    Downsample(
                        hs[-1].shape[-1], self.downsample, dt, name=f"down{level}_downsample"
                    )(hs[-1])
                )

        hcur = res(hs[-1].shape[-1], "mid_res0")(hs[-1], emb, train=train)
        hcur = attn("mid_attn")(hcur)
        hcur = res(hcur.shape[-1], "mid_res1")(hcur, emb, train=train)

        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(self.num_res_blocks + 1):
                hcur = jnp.concatenate([hcur, hs.pop()], axis=-1)
                hcur = res(self.base_channels * mult, f"up{level}_res{i}")(hcur, emb, train=train)
                if hcur.shape[1] in self.attention_resolutions:
                    hcur = attn(f"up{level}_attn{i}")(hcur)
            if level != 0:
                hcur = Upsample(
                    hcur.shape[-1],
                    self.upsample,
                    self.upsample_kernel,
                    2,
                    self.upsample_padding,
                    self.upsample_output_padding,
                    dt,
                    name=f"up{level}_upsample",
                )(hcur)
        assert not hs

        hcur = act(GroupNorm(self.num_groups, dt, name="norm_out")(hcur))
        out = nn.Conv(
            self.out_channels, (3, 3), dtype=dt, kernel_init=nn.initializers.zeros, name="conv_out"
        )(hcur)
        return out.astype(jnp.float32)
