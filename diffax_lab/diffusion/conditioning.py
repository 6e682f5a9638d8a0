"""Low-resolution conditioning for super-resolution (SR3, Saharia et al. 2021; Cascaded
Diffusion Models, Ho et al. 2021): area downsampling, resizing up, and Gaussian
conditioning augmentation.

Conditioning augmentation (CDM, section 4.1; Imagen's "noise conditioning augmentation")
noises the low-resolution image with a variance-preserving forward process at level
s in [0, 1] and tells the network s:

    z_s = sqrt(abar(s)) x_lr + sqrt(1 - abar(s)) eps,   abar(s) = cos(pi s / 2)^2

(the cosine schedule without offset, so s = 0 is the image itself exactly and s = 1 is pure
noise). Training draws s ~ U[0, s_max]; sampling fixes s (a flag), which makes the
upsampler robust to the artefacts of the base model that produced x_lr.

Not for: networks (``models/sr_unet.py`` embeds s) or the choice of s (the tasks).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def area_downsample(x, factor: int):
    """[B, H, W, C] -> [B, H/f, W/f, C]: the mean of each f x f block (area resampling)."""
    if factor == 1:
        return x
    b, h, w, c = x.shape
    if h % factor or w % factor:
        raise ValueError(f"{h}x{w} images do not divide by the downsampling factor {factor}.")
    return x.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


def resize_up(x, size: int, method: str = "bicubic"):
    """[B, h, w, C] -> [B, size, size, C] (jax.image.resize; bicubic as SR3)."""
    b, _, _, c = x.shape
    return jax.image.resize(x, (b, size, size, c), method=method)


def aug_alpha_bar(level):
    """abar(s) = cos(pi s / 2)^2: 1 at s = 0, 0 at s = 1."""
    return jnp.cos(0.5 * jnp.pi * jnp.asarray(level, jnp.float32)) ** 2


def augment(x, level, key):
    """z_s of x [B, ...] at levels ``level`` [B] (or a scalar); s = 0 returns x itself."""
    level = jnp.broadcast_to(jnp.asarray(level, jnp.float32), x.shape[:1])
    ab = aug_alpha_bar(level).reshape((-1,) + (1,) * (x.ndim - 1))
    noise = jax.random.normal(key, x.shape, x.dtype)
    # s = 0: sqrt(1) x + sqrt(0) eps is x bit for bit.
    return jnp.sqrt(ab) * x + jnp.sqrt(1.0 - ab) * noise
