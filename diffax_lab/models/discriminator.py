"""The patch-GAN discriminator of latent diffusion's autoencoder: taming-transformers'
``NLayerDiscriminator`` (Esser et al. 2021, after pix2pix's PatchGAN, Isola et al. 2017), NHWC,
Flax Linen.

``NLayerDiscriminator().apply(variables, x, train=...)`` maps images [B, H, W, C] to one logit
per overlapping patch, [B, H', W', 1] (30 x 30 for 256 x 256 inputs with the defaults, each
patch 70 x 70 pixels). Layers: a 4x4 stride-2 convolution and LeakyReLU(0.2); ``n_layers - 1``
more stride-2 convolutions doubling the width (capped at 8 ``ndf``), each with a norm and
LeakyReLU; one stride-1 convolution the same way; a 4x4 stride-1 convolution to one channel.
All convolutions pad by one. Convolutions before a norm have no bias, as in taming.

``norm``: ``"batch"`` (taming's default, BatchNorm with momentum 0.1 in PyTorch's sense and
eps 1e-5; ``train=True`` normalises with the batch's statistics and needs
``mutable=["batch_stats"]``, ``train=False`` uses the running averages) or ``"none"``.
Initialisation is taming's ``weights_init``: convolution kernels N(0, 0.02), norm scales
N(1, 0.02), biases zero (taming leaves PyTorch's default conv bias; only the first and last
convolutions have one).

Not for: the adversarial losses or the adaptive weight (``diffax_lab.diffusion.latent``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

NORMS = ("batch", "none")


def _scale_init(key, shape, dtype=jnp.float32):
    return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


class NLayerDiscriminator(nn.Module):
    ndf: int = 64  # width of the first convolution
    n_layers: int = 3  # stride-2 convolutions; the receptive field is 70 px for 3
    norm: str = "batch"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        if self.norm not in NORMS:
            raise ValueError(f"discriminator norm must be one of {NORMS}, got {self.norm!r}.")
        dt = self.dtype
        kernel_init = nn.initializers.normal(0.02)

        def conv(features, stride, bias, name):
            return nn.Conv(
                features,
                (4, 4),
                strides=(stride, stride),
                padding=((1, 1), (1, 1)),
                use_bias=bias,
                kernel_init=kernel_init,
                dtype=dt,
                name=name,
            )

        def norm(h, name):
            if self.norm == "none":
                return h
            return nn.BatchNorm(
                use_running_average=not train,
                momentum=0.9,  # PyTorch's momentum 0.1
                epsilon=1e-5,
                use_fast_variance=False,
                scale_init=_scale_init,
                dtype=jnp.float32,
                name=name,
            )(h.astype(jnp.float32)).astype(dt)

        use_bias = self.norm == "none"  # taming: no bias before a BatchNorm
        h = nn.leaky_relu(conv(self.ndf, 2, True, "conv_0")(x.astype(dt)), 0.2)
        mult = 1
        for n in range(1, self.n_layers + 1):
            mult = min(2**n, 8)
            stride = 2 if n < self.n_layers else 1
            h = conv(self.ndf * mult, stride, use_bias, f"conv_{n}")(h)
            h = nn.leaky_relu(norm(h, f"norm_{n}"), 0.2)
        out = conv(1, 1, True, f"conv_{self.n_layers + 1}")(h)
        return out.astype(jnp.float32)
