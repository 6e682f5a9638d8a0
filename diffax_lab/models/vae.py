"""The KL autoencoder of latent diffusion (Rombach et al. 2022), NHWC, Flax Linen: a port of
diffusers' ``AutoencoderKL`` whose parameter tree mirrors its state-dict names one to one.

``AutoencoderKL(config).apply(params, x, method="encode")`` -> ``(mean, logvar)``, each
[B, H/f, W/f, latent_channels] with f = 2^(len(block_out_channels) - 1): the posterior
q(z | x) = N(mean, exp(logvar)) with diffusers' ``DiagonalGaussianDistribution`` semantics
(the encoder's 2 * latent_channels outputs split into mean and log-variance, the latter
clamped to [-30, 20]). ``method="decode"`` maps latents z to images. ``__call__(x, key=None)``
encodes, decodes the posterior mean (or, given a key, one reparameterised sample) and returns
``(reconstruction, mean, logvar)``; it touches every parameter, so it is what ``init`` calls.

Architecture (diffusers' Encoder/Decoder): ``conv_in``; per level a DownEncoderBlock2D of
``layers_per_block`` ResNet blocks and, except at the last level, a stride-2 convolution after
a (0, 1, 0, 1) pad; a mid block ResNet -> single-head self-attention (optional:
``mid_block_add_attention``) -> ResNet; GroupNorm -> SiLU -> ``conv_out``. The decoder mirrors
it with ``layers_per_block + 1`` ResNet blocks per UpDecoderBlock2D and nearest x2 upsampling
followed by a 3x3 convolution. Every GroupNorm has eps = 1e-6. ``quant_conv`` and
``post_quant_conv`` are 1x1 convolutions around the latent (optional, as in diffusers).

Naming: the Flax path of every parameter is the diffusers key with each ``.<i>.`` written
``_<i>`` and its last part renamed: ``weight`` -> ``kernel`` (Conv: OIHW -> HWIO; Linear:
transposed) or ``scale`` (GroupNorm); ``bias`` stays. ``diffax_lab.models.autoencoder_kl_io``
converts both ways and reads/writes diffusers folders.

The GroupNorm and attention blocks are this module's own (not ``layers.py``'s): their names
and eps must match diffusers' for checkpoints to load.

Not for: the autoencoder's losses, the latent scale factor or the prior
(``diffax_lab.diffusion.latent``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffax_lab.models.layers import Conv

DOWN_BLOCK_TYPES = ("DownEncoderBlock2D",)
UP_BLOCK_TYPES = ("UpDecoderBlock2D",)
ACT_FNS = ("silu", "swish")  # the same function under diffusers' two names
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamp
NORM_EPS = 1e-6
# The path of the decoder's last convolution kernel: the "last layer" of LDM's adaptive
# discriminator weight (taming-transformers' LPIPSWithDiscriminator).
LAST_LAYER = ("decoder", "conv_out", "kernel")


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """diffusers' ``AutoencoderKL`` config; the field names and defaults are diffusers'.

    Only DownEncoderBlock2D / UpDecoderBlock2D blocks exist, so the block-type lists are not
    fields: ``to_diffusers_dict`` writes them, ``from_diffusers_dict`` refuses any other type.
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    # Metadata, kept and written back but not used by the networks: image size the checkpoint was trained at (diffusers uses
    # it for tiling only), z -> (z - shift_factor) * scaling_factor for the latent model,
    # per-channel latent statistics, and whether pipelines must run the VAE in float32.
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True

    def __post_init__(self):
        # JSON gives lists; tuples keep the config hashable (a Flax module field).
        for name in ("block_out_channels", "latents_mean", "latents_std", "sample_size"):
            v = getattr(self, name)
            if isinstance(v, list):
                object.__setattr__(self, name, tuple(v))

    @property
    def downsample_factor(self) -> int:
        """Image side / latent side: 2 ^ (levels - 1)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """[H/f, W/f, latent_channels] for an image of height x width (must divide by f)."""
        f = self.downsample_factor
        if height % f or width % f:
            raise ValueError(
                f"Image {height}x{width} does not divide by the autoencoder's downsampling "
                f"factor {f} = 2^(len(block_out_channels) - 1); resize or pad the data."
            )
        return (height // f, width // f, self.latent_channels)

    def validate(self) -> None:
        """Raises ValueError naming the field when the networks cannot be built."""
        if not self.block_out_channels:
            raise ValueError("block_out_channels must list at least one level's width.")
        for ch in self.block_out_channels:
            if ch % self.norm_num_groups:
                raise ValueError(
                    f"norm_num_groups={self.norm_num_groups} must divide every entry of "
                    f"block_out_channels={list(self.block_out_channels)}; {ch} is not a multiple."
                )
        if self.act_fn not in ACT_FNS:
            raise ValueError(
                f"act_fn={self.act_fn!r} is not supported by the Flax AutoencoderKL "
                f"(only {' / '.join(ACT_FNS)})."
            )
        if self.layers_per_block < 1 or self.latent_channels < 1:
            raise ValueError("layers_per_block and latent_channels must be >= 1.")

    @classmethod
    def from_diffusers_dict(cls, d: dict) -> AutoencoderKLConfig:
        """From a diffusers ``AutoencoderKL`` config.json; anything the Flax networks cannot
        represent (another class, block type or activation, an unknown key) is refused by name."""
        name = d.get("_class_name", "AutoencoderKL")
        if name != "AutoencoderKL":
            raise ValueError(
                f"config.json describes a diffusers {name}, not an AutoencoderKL; only "
                "AutoencoderKL checkpoints load into the Flax VAE."
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        known = fields | {"down_block_types", "up_block_types"}
        unknown = sorted(k for k in d if not k.startswith("_") and k not in known)
        if unknown:
            raise ValueError(
                f"AutoencoderKL config option(s) {unknown} are not supported by the Flax VAE "
                f"(it knows {sorted(known)})."
            )
        levels = len(d.get("block_out_channels", cls.block_out_channels))
        for key, allowed in (
            ("down_block_types", DOWN_BLOCK_TYPES),
            ("up_block_types", UP_BLOCK_TYPES),
        ):
            types = list(d.get(key, [allowed[0]]))
            bad = sorted({t for t in types if t not in allowed})
            if bad:
                raise ValueError(
                    f"{key} contains {bad}; the Flax VAE supports only {list(allowed)}."
                )
            if len(types) != levels:
                raise ValueError(
                    f"{key} has {len(types)} entries but block_out_channels has {levels}; "
                    "diffusers needs one block per level."
                )
        config = cls(**{k: v for k, v in d.items() if k in fields})
        config.validate()
        return config

    def to_diffusers_dict(self) -> dict:
        """The config.json that ``diffusers.AutoencoderKL.from_pretrained`` reads."""
        d = dataclasses.asdict(self)
        levels = len(self.block_out_channels)
        d["block_out_channels"] = list(self.block_out_channels)
        for k in ("latents_mean", "latents_std", "sample_size"):
            if isinstance(d[k], tuple):
                d[k] = list(d[k])
        return {
            "_class_name": "AutoencoderKL",
            "down_block_types": [DOWN_BLOCK_TYPES[0]] * levels,
            "up_block_types": [UP_BLOCK_TYPES[0]] * levels,
            **d,
        }


class GroupNorm32(nn.Module):
    """torch.nn.GroupNorm(eps=1e-6) with statistics in float32, cast to the compute dtype.
    Its parameters sit directly under its name (``norm1/scale``), as in diffusers."""

    num_groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        b = x.shape[0]
        g = x.astype(jnp.float32).reshape(b, -1, self.num_groups, c // self.num_groups)
        mean = g.mean(axis=(1, 3), keepdims=True)
        var = jnp.square(g - mean).mean(axis=(1, 3), keepdims=True)  # biased, as torch's
        y = ((g - mean) * jax.lax.rsqrt(var + NORM_EPS)).reshape(x.shape)
        return (y * scale + bias).astype(self.dtype)


def _conv(features, kernel, dtype, name, stride=1, padding=None):
    pad = kernel // 2 if padding is None else padding
    return Conv(  # layers.Conv: nn.Conv's parameters; 1x1 as a dot on the CPU
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        dtype=dtype,
        name=name,
    )


class ResnetBlock2D(nn.Module):
    """diffusers' ResnetBlock2D without a time embedding: norm -> SiLU -> conv, twice, plus a
    1x1 ``conv_shortcut`` when the width changes; output scale factor 1, no dropout."""

    out_channels: int
    num_groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        dt = self.dtype
        h = nn.silu(GroupNorm32(self.num_groups, dt, name="norm1")(x))
        h = _conv(self.out_channels, 3, dt, "conv1")(h)
        h = nn.silu(GroupNorm32(self.num_groups, dt, name="norm2")(h))
        h = _conv(self.out_channels, 3, dt, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, dt, "conv_shortcut")(x)
        return x + h


class Attention(nn.Module):
    """The mid block's single-head self-attention over the H*W positions (diffusers'
    ``Attention`` with ``heads = 1``, ``dim_head = channels``, residual, softmax in float32)."""

    num_groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        dt = self.dtype
        y = GroupNorm32(self.num_groups, dt, name="group_norm")(x).reshape(b, h * w, c)
        q = nn.Dense(c, dtype=dt, name="to_q")(y)
        k = nn.Dense(c, dtype=dt, name="to_k")(y)
        v = nn.Dense(c, dtype=dt, name="to_v")(y)
        logits = jnp.einsum("bqc,bkc->bqk", q, k).astype(jnp.float32) * c**-0.5
        weights = jax.nn.softmax(logits, axis=-1).astype(dt)
        y = jnp.einsum("bqk,bkc->bqc", weights, v)
        y = nn.Dense(c, dtype=dt, name="to_out_0")(y)
        return x + y.reshape(b, h, w, c)


class MidBlock(nn.Module):
    """UNetMidBlock2D: ResNet -> attention (optional) -> ResNet at constant width."""

    num_groups: int
    add_attention: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        x = ResnetBlock2D(c, self.num_groups, self.dtype, name="resnets_0")(x)
        if self.add_attention:
            x = Attention(self.num_groups, self.dtype, name="attentions_0")(x)
        return ResnetBlock2D(c, self.num_groups, self.dtype, name="resnets_1")(x)


class Downsample2D(nn.Module):
    """diffusers' Downsample2D(padding=0): pad right and bottom by one, then a 3x3 stride-2
    convolution without padding."""

    out_channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(self.out_channels, 3, self.dtype, "conv", stride=2, padding=0)(x)


class Upsample2D(nn.Module):
    """diffusers' Upsample2D: nearest-neighbour x2, then a 3x3 convolution."""

    out_channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(self.out_channels, 3, self.dtype, "conv")(x)


class DownEncoderBlock2D(nn.Module):
    out_channels: int
    num_layers: int
    num_groups: int
    add_downsample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.num_groups, self.dtype, name=f"resnets_{i}")(
                x
            )
        if self.add_downsample:
            x = Downsample2D(self.out_channels, self.dtype, name="downsamplers_0")(x)
        return x


class UpDecoderBlock2D(nn.Module):
    out_channels: int
    num_layers: int
    num_groups: int
    add_upsample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.num_groups, self.dtype, name=f"resnets_{i}")(
                x
            )
        if self.add_upsample:
            x = Upsample2D(self.out_channels, self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """[B, H, W, in_channels] -> [B, H/f, W/f, 2 * latent_channels] (mean and log-variance,
    before ``quant_conv``)."""

    config: AutoencoderKLConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c, dt = self.config, self.dtype
        widths = c.block_out_channels
        x = _conv(widths[0], 3, dt, "conv_in")(x.astype(dt))
        for i, width in enumerate(widths):
            x = DownEncoderBlock2D(
                width,
                c.layers_per_block,
                c.norm_num_groups,
                add_downsample=i != len(widths) - 1,
                dtype=dt,
                name=f"down_blocks_{i}",
            )(x)
        x = MidBlock(c.norm_num_groups, c.mid_block_add_attention, dt, name="mid_block")(x)
        x = nn.silu(GroupNorm32(c.norm_num_groups, dt, name="conv_norm_out")(x))
        return _conv(2 * c.latent_channels, 3, dt, "conv_out")(x)


class Decoder(nn.Module):
    """[B, h, w, latent_channels] (after ``post_quant_conv``) -> [B, h f, w f, out_channels]."""

    config: AutoencoderKLConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z):
        c, dt = self.config, self.dtype
        widths = tuple(reversed(c.block_out_channels))
        x = _conv(widths[0], 3, dt, "conv_in")(z.astype(dt))
        x = MidBlock(c.norm_num_groups, c.mid_block_add_attention, dt, name="mid_block")(x)
        for i, width in enumerate(widths):
            x = UpDecoderBlock2D(
                width,
                c.layers_per_block + 1,
                c.norm_num_groups,
                add_upsample=i != len(widths) - 1,
                dtype=dt,
                name=f"up_blocks_{i}",
            )(x)
        x = nn.silu(GroupNorm32(c.norm_num_groups, dt, name="conv_norm_out")(x))
        return _conv(c.out_channels, 3, dt, "conv_out")(x)


class AutoencoderKL(nn.Module):
    """The KL autoencoder; ``dtype`` is the compute dtype, parameters stay float32 and the
    outputs (mean, log-variance, images) are float32."""

    config: AutoencoderKLConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        c.validate()
        self.encoder = Encoder(c, self.dtype)
        self.decoder = Decoder(c, self.dtype)
        self.quant_conv = (
            _conv(2 * c.latent_channels, 1, self.dtype, None) if c.use_quant_conv else None
        )
        self.post_quant_conv = (
            _conv(c.latent_channels, 1, self.dtype, None) if c.use_post_quant_conv else None
        )

    def encode(self, x):
        """[B, H, W, in_channels] -> (mean, logvar), each [B, H/f, W/f, latent_channels]."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z):
        """[B, h, w, latent_channels] (unscaled latents) -> [B, h f, w f, out_channels]."""
        z = z.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x, key=None):
        """(reconstruction, mean, logvar): decodes the posterior mean, or with ``key`` one
        sample z = mean + exp(logvar / 2) * eps (the reparameterisation of Kingma & Welling)."""
        mean, logvar = self.encode(x)
        z = mean
        if key is not None:
            z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
        return self.decode(z), mean, logvar
