"""Networks only: they know nothing of schedules or losses.

One registry of networks, chosen by ``config.model.name``: a builder takes the whole config
(a network's size can depend on the data section) and returns a Flax module. A new network
is one ``@register_model("name")`` function here or beside its module.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

from diffax_lab.errors import ConfigError
from diffax_lab.models.classifier import Classifier
from diffax_lab.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig
from diffax_lab.models.unet import UNet
from diffax_lab.models.vae import AutoencoderKL, AutoencoderKLConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def ddpm_cifar10_unet(**overrides) -> UNet:
    """Ho et al. (2020), App. B: the 35.7M-parameter CIFAR-10 network."""
    kwargs = dict(
        out_channels=3,
        base_channels=128,
        channel_mult=(1, 2, 2, 2),
        num_res_blocks=2,
        attention_resolutions=(16,),
        dropout=0.1,
        num_groups=32,
    )
    kwargs.update(overrides)
    return UNet(**kwargs)


MODELS: dict[str, Callable] = {}


def register_model(name: str):
    """Decorator: ``builder(config) -> flax module`` selectable as ``model.name = name``."""

    def wrap(fn):
        if name in MODELS:
            raise ValueError(f"Model {name!r} is registered twice.")
        MODELS[name] = fn
        return fn

    return wrap


def get_model(config):
    """The network named by ``config.model.name``, built from the config."""
    name = config.model.get("name", "unet")
    if name not in MODELS:
        raise ConfigError(f"config.model.name={name!r} must be one of {sorted(MODELS)}.")
    return MODELS[name](config)


def compute_dtype(config):
    c = config.model
    if c.dtype not in DTYPES:
        raise ConfigError(f"config.model.dtype={c.dtype!r} must be one of {sorted(DTYPES)}.")
    return DTYPES[c.dtype]


@register_model("unet")
def build_unet(config, out_channels: int | None = None) -> UNet:
    """The U-Net from the ``model`` section; it predicts data.channels channels."""
    c = config.model
    return UNet(
        out_channels=out_channels or config.data.channels,
        base_channels=c.base_channels,
        channel_mult=tuple(c.channel_mult),
        num_res_blocks=c.num_res_blocks,
        attention_resolutions=tuple(c.attention_resolutions),
        attention_heads=c.attention_heads,
        dropout=c.dropout,
        num_groups=c.num_groups,
        activation=c.activation,
        time_embedding=c.time_embedding,
        time_index_offset=c.get("time_index_offset", 0.0),
        downsample=c.downsample,
        upsample=c.upsample,
        upsample_kernel=c.upsample_kernel,
        upsample_padding=c.upsample_padding,
        upsample_output_padding=c.upsample_output_padding,
        num_classes=c.num_classes,
        cond_dim=c.cond_dim,
        cross_attention_dim=c.get("cross_attention_dim", 0),
        transformer_depth=c.get("transformer_depth", 1),
        dtype=compute_dtype(config),
        **{f: _tuple(c[f]) for f in UNET_DIFFUSERS_FIELDS + UNET_ABLATION_FIELDS if f in c},
    )


# U-Net options of the model section that diffusers' UNet2DModel needs (configs/ddpm.py);
# configs without them build the U-Net's defaults.
UNET_DIFFUSERS_FIELDS = (
    "time_scale",
    "time_flip_sin_to_cos",
    "time_freq_shift",
    "norm_eps",
    "downsample_padding",
    "attention_head_dim",
    "attention_levels",
    "mid_attention",
    "center_input",
    "outer_activation",
)

# Ablation switches of the model section (configs/ddpm.py: norm, residual); configs
# without them build the U-Net's defaults.
UNET_ABLATION_FIELDS = ("norm", "residual")


def _tuple(value):
    return tuple(value) if isinstance(value, list | tuple) else value


@register_model("classifier")
def build_classifier(config) -> Classifier:
    """The noise-conditioned classifier (the U-Net's encoder, pooled); model.num_classes
    outputs."""
    c = config.model
    return Classifier(
        num_classes=c.num_classes,
        base_channels=c.base_channels,
        channel_mult=tuple(c.channel_mult),
        num_res_blocks=c.num_res_blocks,
        attention_resolutions=tuple(c.attention_resolutions),
        attention_heads=c.attention_heads,
        dropout=c.dropout,
        num_groups=c.num_groups,
        activation=c.activation,
        downsample=c.downsample,
        dtype=compute_dtype(config),
    )


def clip_config(config) -> CLIPConfig:
    """The CLIP architecture of a ``clip`` section (the lab's CLIP, configs/clip.py)."""
    k = config.clip
    return CLIPConfig(
        text=TextConfig(
            vocab_size=k.vocab_size,
            hidden_size=k.text_width,
            intermediate_size=4 * k.text_width,
            num_hidden_layers=k.text_layers,
            num_attention_heads=k.heads,
            max_position_embeddings=k.context_length,
            eos_token_id=1,
        ),
        vision=VisionConfig(
            hidden_size=k.vision_width,
            intermediate_size=4 * k.vision_width,
            num_hidden_layers=k.vision_layers,
            num_attention_heads=k.heads,
            image_size=config.data.image_size,
            patch_size=k.patch_size,
            num_channels=3,
        ),
        projection_dim=k.projection_dim,
    )


@register_model("clip")
def build_clip(config) -> CLIP:
    """CLIP in Hugging Face's parameter layout, computing in model.dtype."""
    return CLIP(clip_config(config), compute_dtype(config))


def autoencoder_kl_config(config) -> AutoencoderKLConfig:
    """The KL autoencoder of an ``autoencoder`` section (diffusers' field names) for the
    data section's images: in and out channels are data.channels, sample_size data.image_size.
    Raises ConfigError naming the field the networks cannot be built with."""
    a = config.autoencoder
    try:
        ae = AutoencoderKLConfig(
            in_channels=config.data.channels,
            out_channels=config.data.channels,
            block_out_channels=tuple(a.block_out_channels),
            layers_per_block=a.layers_per_block,
            latent_channels=a.latent_channels,
            norm_num_groups=a.norm_num_groups,
            mid_block_add_attention=a.mid_block_add_attention,
            use_quant_conv=a.use_quant_conv,
            use_post_quant_conv=a.use_post_quant_conv,
            sample_size=config.data.image_size,
        )
        ae.validate()
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.autoencoder: {e}") from None
    return ae


@register_model("autoencoder_kl")
def build_autoencoder_kl(config) -> AutoencoderKL:
    """diffusers' AutoencoderKL from the ``autoencoder`` section, computing in model.dtype."""
    return AutoencoderKL(autoencoder_kl_config(config), compute_dtype(config))
