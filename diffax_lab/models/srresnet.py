"""SRResNet (Ledig et al. 2017, "Photo-realistic single image super-resolution using a
generative adversarial network", section 2.2 / fig. 4), the regression upsampler the
CelebA course project used, scaled down.

conv 9x9 -> PReLU -> B residual blocks (conv 3x3, norm, PReLU, conv 3x3, norm, + skip)
-> conv 3x3, norm, + the long skip -> log2(factor) x (conv 3x3 to 4F channels, pixel
shuffle x2, PReLU) -> conv 9x9 to C channels. Batch norm is replaced by GroupNorm (no
running statistics to carry; EDSR drops the norm altogether), and the output is added to
the bicubic upsampling of the input (the network learns the residual), a common and
harmless change that speeds training. Input [B, h, w, C] in [-1, 1]; output
[B, factor h, factor w, C].
"""

from __future__ import annotations

import flax.linen as nn
import jax

from diffax_lab.models import register_model


def pixel_shuffle(x, r: int = 2):
    """[B, h, w, r^2 C] -> [B, r h, r w, C] (depth-to-space, PyTorch's PixelShuffle order)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h, w, c // (r * r), r, r)
    return x.transpose(0, 1, 4, 2, 5, 3).reshape(b, h * r, w * r, c // (r * r))


class ResidualBlock(nn.Module):
    features: int
    groups: int

    @nn.compact
    def __call__(self, x):
        h = nn.Conv(self.features, (3, 3))(x)
        h = nn.PReLU()(nn.GroupNorm(self.groups)(h))
        h = nn.GroupNorm(self.groups)(nn.Conv(self.features, (3, 3))(h))
        return x + h


class SRResNet(nn.Module):
    out_channels: int = 1
    features: int = 64
    num_blocks: int = 16
    factor: int = 2  # a power of 2
    groups: int = 8

    @nn.compact
    def __call__(self, x):
        if self.factor & (self.factor - 1) or self.factor < 2:
            raise ValueError(f"SRResNet upsamples by a power of 2 >= 2, not {self.factor}.")
        b, h, w, c = x.shape
        base = jax.image.resize(x, (b, h * self.factor, w * self.factor, c), method="bicubic")
        first = nn.PReLU()(nn.Conv(self.features, (9, 9))(x))
        y = first
        for i in range(self.num_blocks):
            y = ResidualBlock(self.features, self.groups, name=f"block{i}")(y)
        y = nn.GroupNorm(self.groups)(nn.Conv(self.features, (3, 3))(y)) + first
        for _ in range(self.factor.bit_length() - 1):
            y = nn.PReLU()(pixel_shuffle(nn.Conv(4 * self.features, (3, 3))(y), 2))
        out = nn.Conv(self.out_channels, (9, 9), kernel_init=nn.initializers.zeros)(y)
        return base + out


@register_model("srresnet")
def build_srresnet(config) -> SRResNet:
    """The SRResNet of an ``upsampler`` section (registered when this module is imported,
    as tasks/upsampler.py does)."""
    u = config.upsampler
    return SRResNet(
        out_channels=config.data.channels,
        features=u.features,
        num_blocks=u.num_blocks,
        factor=u.factor,
        groups=u.groups,
    )
