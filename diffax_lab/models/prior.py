"""The unCLIP prior's network (DALL-E 2, Ramesh et al. 2022, section 2.1): a denoiser of
CLIP image embeddings conditioned on the CLIP text embedding, here a residual MLP (DALL-E 2
uses a decoder-only transformer over [text tokens, text embedding, time, noised image
embedding, query]; for one conditioning vector an MLP on their concatenation suffices).

``PriorMLP(dim, width, depth).apply(params, x, t, cond=text_emb, cond_mask=m)``
- ``x`` [B, dim] the noised image embedding z_t, ``t`` [B] in [0, 1] (embedded as 1000 t);
- ``cond`` [B, dim] the text embedding; rows where ``cond_mask`` is False use a learned
  null vector (classifier-free guidance, trained by dropping the text);
- returns [B, dim]: the prediction (x0 in DALL-E 2: the clean image embedding).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from diffax_lab.models.layers import sinusoidal_embedding


class PriorMLP(nn.Module):
    dim: int
    width: int = 256
    depth: int = 4

    @nn.compact
    def __call__(self, x, t, cond=None, cond_mask=None, *, train: bool = False):
        if cond is None:
            raise ValueError(f"The prior takes a [B, {self.dim}] text embedding (cond).")
        null = self.param("cond_null", nn.initializers.normal(0.02), (self.dim,))
        if cond_mask is not None:
            cond = jnp.where(cond_mask[:, None], cond, null[None, :])
        temb = sinusoidal_embedding(1000.0 * t, self.width)
        h = nn.Dense(self.width, name="in")(jnp.concatenate([x, cond], -1))
        h = h + nn.Dense(self.width, name="time")(nn.silu(temb))
        for i in range(self.depth):
            r = nn.LayerNorm(name=f"norm{i}")(h)
            r = nn.Dense(2 * self.width, name=f"up{i}")(r)
            r = nn.Dense(self.width, name=f"down{i}")(nn.silu(r))
            h = h + r + nn.Dense(self.width, name=f"t{i}")(nn.silu(temb))
        h = nn.LayerNorm(name="norm_out")(h)
        return nn.Dense(self.dim, kernel_init=nn.initializers.zeros, name="out")(h)
