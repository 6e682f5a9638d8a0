"""Stable Diffusion's spatial transformer (LDM's ``SpatialTransformer``; diffusers'
``Transformer2DModel`` with ``BasicTransformerBlock``), NHWC, Flax Linen: how text enters the
U-Net through cross-attention.

``SpatialTransformer(...)(x, context, context_mask)``:
- ``x`` [B, H, W, C] feature map; ``context`` [B, L, D] a token sequence (the CLIP text
  encoder's last hidden states); ``context_mask`` [B, L] bool, True for real tokens (None:
  every token).
- GroupNorm -> ``proj_in`` (a 1x1 convolution, i.e. a Dense over channels, C -> heads x
  head_dim) -> ``depth`` ``TransformerBlock``s over the H*W positions -> ``proj_out`` (zero
  initialised as LDM's ``zero_module``, so a new block starts as the identity) -> + x.
- ``TransformerBlock``: pre-LayerNorm residual branches: self-attention (``attn1``),
  cross-attention to the context (``attn2``: queries from the pixels, keys and values from
  the tokens), GEGLU feed-forward (``ff``: Dense to 2 x 4C, value * GELU(gate), the exact
  erf GELU as torch's, Dense back to C).

Masking (an addition to diffusers, which attends to every token, padding included): keys of
masked tokens are left out, and a sample whose mask is all False gets no cross-attention term
at all (the whole ``attn2`` branch, its output bias included, is multiplied by 0), so the
block is then exactly its self-attention and feed-forward path.

Parameter names follow diffusers' (``norm``, ``proj_in``, ``transformer_blocks_<i>`` with
``norm1..3``, ``attn1``/``attn2`` of ``to_q``/``to_k``/``to_v`` without bias and ``to_out``
with, ``ff_proj``/``ff_out``, ``proj_out``), so a diffusers state dict maps over by renaming
and transposing (tests/models/test_transformer.py does it for the parity check).

Not for: the U-Net around it (``unet.py``: ``model.cross_attention_dim`` puts one of these
wherever ``attention_resolutions`` put self-attention) or the text encoder (``clip.py``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from diffax_lab.models.layers import GroupNorm, dot_product_attention


def gelu_exact(x):
    return nn.gelu(x, approximate=False)


class Attention(nn.Module):
    """Multi-head attention of queries x [B, T, C] to keys/values of ``context`` [B, L, D]
    (x itself when None); ``mask`` [B, L] bool leaves keys out."""

    num_heads: int
    head_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context=None, mask=None):
        b, t, c = x.shape
        context = x if context is None else context
        inner = self.num_heads * self.head_dim

        def proj(name):
            return nn.Dense(inner, use_bias=False, dtype=self.dtype, name=name)

        q = proj("to_q")(x).reshape(b, t, self.num_heads, self.head_dim)
        k = proj("to_k")(context).reshape(b, -1, self.num_heads, self.head_dim)
        v = proj("to_v")(context).reshape(b, -1, self.num_heads, self.head_dim)
        attn_mask = None if mask is None else mask.astype(bool)[:, None, None, :]
        y = dot_product_attention(q, k, v, mask=attn_mask).reshape(b, t, inner)
        return nn.Dense(c, dtype=self.dtype, name="to_out")(y)


class TransformerBlock(nn.Module):
    """diffusers' ``BasicTransformerBlock`` (layer_norm, GEGLU), with a context mask."""

    num_heads: int
    head_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context, context_mask=None):
        dt = self.dtype
        c = x.shape[-1]

        def norm(name, h):
            y = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, name=name)(h.astype(jnp.float32))
            return y.astype(dt)

        x = x + Attention(self.num_heads, self.head_dim, dt, name="attn1")(norm("norm1", x))
        cross = Attention(self.num_heads, self.head_dim, dt, name="attn2")(
            norm("norm2", x), context.astype(dt), context_mask
        )
        if context_mask is not None:  # no token at all: no cross-attention term
            any_token = jnp.any(context_mask.astype(bool), axis=-1)
            cross = cross * any_token[:, None, None].astype(cross.dtype)
        x = x + cross
        hidden, gate = jnp.split(nn.Dense(8 * c, dtype=dt, name="ff_proj")(norm("norm3", x)), 2, -1)
        return x + nn.Dense(c, dtype=dt, name="ff_out")(hidden * gelu_exact(gate))


class SpatialTransformer(nn.Module):
    """GroupNorm, proj_in, ``depth`` transformer blocks over pixels, proj_out, residual.

    ``num_heads`` heads of ``C / num_heads`` channels, or with ``head_dim`` > 0, C / head_dim
    heads of that size (as the U-Net's self-attention counts them)."""

    num_heads: int = 1
    head_dim: int = 0
    depth: int = 1
    num_groups: int = 32
    norm_eps: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context, context_mask=None):
        b, h, w, c = x.shape
        if context is None:
            raise ValueError(
                "This U-Net has cross-attention (model.cross_attention_dim > 0): pass context "
                "[B, L, cross_attention_dim] (and context_mask [B, L])."
            )
        if self.head_dim:
            if c % self.head_dim:
                raise ValueError(
                    f"model.attention_head_dim={self.head_dim} must divide every attention "
                    f"block's channels; {c} is not a multiple."
                )
            heads = c // self.head_dim
        else:
            if c % self.num_heads:
                raise ValueError(f"model.attention_heads={self.num_heads} must divide {c}.")
            heads = self.num_heads
        dim = c // heads
        dt = self.dtype
        y = GroupNorm(self.num_groups, dt, self.norm_eps, name="norm")(x)
        y = nn.Dense(heads * dim, dtype=dt, name="proj_in")(y.reshape(b, h * w, c))
        for i in range(self.depth):
            y = TransformerBlock(heads, dim, dt, name=f"transformer_blocks_{i}")(
                y, context, context_mask
            )
        y = nn.Dense(c, dtype=dt, kernel_init=nn.initializers.zeros, name="proj_out")(y)
        return x + y.reshape(b, h, w, c)
