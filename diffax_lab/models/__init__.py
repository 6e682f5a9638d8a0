"""Networks only: they know nothing of schedules or losses."""

from __future__ import annotations

import jax.numpy as jnp

from diffax_lab.models.classifier import Classifier
from diffax_lab.models.unet import UNet

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


def get_model(model_config, out_channels: int) -> UNet:
    """Builds the U-Net from the config's ``model`` section."""
    c = model_config
    if c.dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {c.dtype!r}.")
    return UNet(
        out_channels=out_channels,
        base_channels=c.base_channels,
        channel_mult=tuple(c.channel_mult),
        num_res_blocks=c.num_res_blocks,
        attention_resolutions=tuple(c.attention_resolutions),
        attention_heads=c.attention_heads,
        dropout=c.dropout,
        num_groups=c.num_groups,
        activation=c.activation,
        time_embedding=c.time_embedding,
        downsample=c.downsample,
        upsample=c.upsample,
        upsample_kernel=c.upsample_kernel,
        upsample_padding=c.upsample_padding,
        upsample_output_padding=c.upsample_output_padding,
        num_classes=c.num_classes,
        cond_dim=c.cond_dim,
        dtype=DTYPES[c.dtype],
    )


def get_classifier(model_config) -> Classifier:
    """The noise-conditioned classifier from a classifier config's ``model`` section."""
    c = model_config
    if c.dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {c.dtype!r}.")
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
        dtype=DTYPES[c.dtype],
    )
