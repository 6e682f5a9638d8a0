"""The configurable diffusion U-Net (Ho et al. 2020, App. B), NHWC, Flax Linen.

``UNet(...).apply(params, x, t, y=None, cond=None, cond_mask=None, train=False, rngs=...)``
- ``x`` [B, H, W, C] noised images; H and W must divide by 2^(len(channel_mult) - 1).
- ``t`` [B] continuous time in [0, 1]; embedded as ``time_scale * t - time_index_offset``.
  The schedules put step i (0-based) at t = (i + 1) / T, so with time_scale = T the lab's
  default (offset 0) embeds i + 1, while DDPM's code and diffusers embed i: offset 1.
- ``y`` [B] int class labels in [0, num_classes]; ``num_classes`` itself is the learned null
  token that classifier-free guidance trains and samples with.
- ``cond`` [B, cond_dim] a vector condition (a CLIP embedding, say); rows where
  ``cond_mask`` is False are replaced by a learned null vector.
- ``context`` [B, L, cross_attention_dim] a token sequence (CLIP's last hidden states) and
  ``context_mask`` [B, L] bool: with ``cross_attention_dim`` > 0 every attention block is
  Stable Diffusion's spatial transformer (``transformer.py``: self-attention, cross-attention
  to the context, GEGLU feed-forward; ``transformer_depth`` blocks each) instead of plain
  self-attention, at the same places (``attention_resolutions``, ``attention_levels``, middle).

``norm`` ("group" | "none": GroupNorm in every block, attention and the output head, or no
normalisation at all) and ``residual`` (False: each ResBlock is two convs without the skip
path) exist for ablations (notebooks/02_unet_ablation.py); their defaults are the network
every checkpoint was trained as.

The options after ``dtype`` exist so that diffusers' ``UNet2DModel`` checkpoints map
onto this network (``diffusers_unet.py``); each defaults to the lab's own behaviour, so
every lab checkpoint keeps its meaning.

Not for: schedules or losses: the network knows nothing of the diffusion process.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from diffax_lab.models.layers import (
    ACTIVATIONS,
    NORMS,
    AttentionBlock,
    Conv,
    Downsample,
    ResBlock,
    Upsample,
    make_norm,
    sinusoidal_embedding,
)
from diffax_lab.models.transformer import SpatialTransformer

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
    # Embedded time is time_scale * t - time_index_offset: 1 embeds step i as DDPM/diffusers.
    time_index_offset: float = 0.0
    time_flip_sin_to_cos: bool = False  # cos before sin in the sinusoid (diffusers' flip)
    time_freq_shift: float = 1.0  # frequencies max_period^(-k / (half - shift)); DDPM's is 1
    norm_eps: float = 1e-6  # every GroupNorm's epsilon (Flax's default; torch's is 1e-5)
    downsample_padding: int = 1  # "conv" downsample: 1 pads both sides, 0 only bottom/right
    attention_head_dim: int = 0  # > 0: channels / head_dim heads per block (not attention_heads)
    attention_levels: Sequence[int] = ()  # levels (0 = full size) with attention at any size
    mid_attention: bool = True  # the attention block between the two middle ResBlocks
    center_input: bool = False  # x -> 2 x - 1 first (diffusers' center_input_sample)
    outer_activation: str = ""  # time MLP and output head; "" = activation (diffusers: silu)
    cross_attention_dim: int = 0  # > 0: spatial transformers attending to a context [B, L, D]
    transformer_depth: int = 1  # transformer blocks per spatial transformer
    norm: str = "group"  # group | none: every GroupNorm, or none (ablations)
    residual: bool = True  # False: ResBlocks without the skip path (ablations)

    @nn.compact
    def __call__(
        self,
        x,
        t,
        y=None,
        cond=None,
        cond_mask=None,
        context=None,
        context_mask=None,
        *,
        train: bool = False,
    ):
        b, h, w, _ = x.shape
        factor = 2 ** (len(self.channel_mult) - 1)
        if h % factor or w % factor:
            raise ValueError(
                f"Input {h}x{w} does not divide by {factor} (2^(len(model.channel_mult) - 1) = "
                f"2^{len(self.channel_mult) - 1}); pad the data (data.image_size) to a multiple "
                f"of {factor} or use fewer levels."
            )
        if self.norm not in NORMS:
            raise ValueError(f"model.norm must be one of {NORMS}, got {self.norm!r}.")
        if not isinstance(self.residual, bool):
            raise ValueError(f"model.residual must be True or False, got {self.residual!r}.")
        if self.norm != "group" and self.cross_attention_dim:
            raise ValueError(
                f"model.norm={self.norm!r} needs model.cross_attention_dim = 0: the spatial "
                "transformer's norms have no switch."
            )
        for ch in [self.base_channels * m for m in self.channel_mult]:
            if self.norm == "group" and ch % self.num_groups:
                raise ValueError(
                    f"model.num_groups={self.num_groups} must divide every level's "
                    f"channels; {ch} is not a multiple."
                )
        for field in ("activation", "outer_activation"):
            value = getattr(self, field)
            if value not in ACTIVATIONS and not (field == "outer_activation" and value == ""):
                raise ValueError(f"model.{field} must be one of {sorted(ACTIVATIONS)}.")
        outer_act = ACTIVATIONS[self.outer_activation or self.activation]
        emb_dim = 4 * self.base_channels
        dt = self.dtype
        if self.center_input:
            x = 2.0 * x - 1.0

        emb = None
        if self.time_embedding == "sinusoidal":
            emb = sinusoidal_embedding(
                self.time_scale * t - self.time_index_offset,
                self.base_channels,
                flip_sin_to_cos=self.time_flip_sin_to_cos,
                freq_shift=self.time_freq_shift,
            )
            self.sow("intermediates", "time_sinusoid", emb)
            emb = nn.Dense(emb_dim, dtype=dt, name="time_dense0")(emb)
            emb = nn.Dense(emb_dim, dtype=dt, name="time_dense1")(outer_act(emb))
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
            return ResBlock(
                features,
                self.num_groups,
                self.dropout,
                self.activation,
                dt,
                self.norm_eps,
                self.norm,
                self.residual,
                name=name,
            )

        if self.cross_attention_dim and context is None:
            raise ValueError(
                "This U-Net has cross-attention (model.cross_attention_dim = "
                f"{self.cross_attention_dim}): pass context [B, L, {self.cross_attention_dim}]."
            )

        def attn(name):
            if self.cross_attention_dim:
                block = SpatialTransformer(
                    self.attention_heads,
                    self.attention_head_dim,
                    self.transformer_depth,
                    self.num_groups,
                    self.norm_eps,
                    dt,
                    name=name,
                )
                return lambda h: block(h, context, context_mask)
            return AttentionBlock(
                self.attention_heads,
                self.num_groups,
                dt,
                self.attention_head_dim,
                self.norm_eps,
                self.norm,
                name=name,
            )

        def has_attention(level, size):
            return level in self.attention_levels or size in self.attention_resolutions

        hs = [Conv(self.base_channels, (3, 3), dtype=dt, name="conv_in")(x.astype(dt))]
        for level, mult in enumerate(self.channel_mult):
            for i in range(self.num_res_blocks):
                hcur = res(self.base_channels * mult, f"down{level}_res{i}")(
                    hs[-1], emb, train=train
                )
                if has_attention(level, hcur.shape[1]):
                    hcur = attn(f"down{level}_attn{i}")(hcur)
                hs.append(hcur)
            if level != len(self.channel_mult) - 1:
                hs.append(
                    Downsample(
                        hs[-1].shape[-1],
                        self.downsample,
                        dt,
                        self.downsample_padding,
                        name=f"down{level}_downsample",
                    )(hs[-1])
                )

        hcur = res(hs[-1].shape[-1], "mid_res0")(hs[-1], emb, train=train)
        if self.mid_attention:
            hcur = attn("mid_attn")(hcur)
        hcur = res(hcur.shape[-1], "mid_res1")(hcur, emb, train=train)

        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(self.num_res_blocks + 1):
                hcur = jnp.concatenate([hcur, hs.pop()], axis=-1)
                hcur = res(self.base_channels * mult, f"up{level}_res{i}")(hcur, emb, train=train)
                if has_attention(level, hcur.shape[1]):
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

        hcur = outer_act(make_norm(self.norm, self.num_groups, dt, self.norm_eps, "norm_out")(hcur))
        out = Conv(
            self.out_channels, (3, 3), dtype=dt, kernel_init=nn.initializers.zeros, name="conv_out"
        )(hcur)
        return out.astype(jnp.float32)
