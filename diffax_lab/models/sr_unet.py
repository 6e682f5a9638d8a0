"""The super-resolution U-Net (SR3 / Cascaded Diffusion Models): the lab's U-Net on
concat(x_t, upsample(z_s)), with the conditioning-augmentation level s as its vector
condition.

``SRUNet(unet=UNet(...)).apply(params, x, t, low_res=z, level=s, mask=m)``
- ``x`` [B, H, W, C] noised high-resolution images, ``t`` [B] in [0, 1];
- ``low_res`` [B, h, w, C] the (augmented) low-resolution image, resized up to H x W
  (bicubic) and concatenated to x as C more input channels (the U-Net's first convolution
  takes whatever channels it is given; its ``out_channels`` stay C);
- ``level`` [B] the augmentation level s, embedded sinusoidally (1000 s, as time is) into
  the U-Net's ``cond`` vector, which it projects and adds to the time embedding: the way
  CDM and Imagen add the augmentation level's embedding to the time embedding;
- ``mask`` [B] bool: False drops the condition for classifier-free guidance (the image to
  zeros, the level to the U-Net's learned null vector).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffax_lab.models.layers import sinusoidal_embedding
from diffax_lab.models.unet import UNet

LEVEL_SCALE = 1000.0  # s in [0, 1] is embedded as 1000 s, like the U-Net's time


def level_embedding(level, dim: int):
    return sinusoidal_embedding(LEVEL_SCALE * jnp.asarray(level, jnp.float32), dim)


class SRUNet(nn.Module):
    unet: UNet

    @nn.compact
    def __call__(self, x, t, low_res=None, level=None, mask=None, *, train: bool = False):
        if low_res is None or level is None:
            raise ValueError("SRUNet needs the low-resolution image and its augmentation level.")
        b, h, w, c = x.shape
        up = jnp.asarray(low_res, x.dtype)
        if up.shape[1:3] != (h, w):
            up = jax_resize(up, h, w)
        if mask is not None:
            up = jnp.where(mask[:, None, None, None], up, 0.0)
        cond = level_embedding(level, self.unet.cond_dim)
        return self.unet(jnp.concatenate([x, up], -1), t, cond=cond, cond_mask=mask, train=train)


def jax_resize(x, h: int, w: int):
    """Bicubic resize of [B, h', w', C] to [B, h, w, C] (SR3's upsampling of x_lr)."""
    return jax.image.resize(x, (x.shape[0], h, w, x.shape[-1]), method="bicubic")
