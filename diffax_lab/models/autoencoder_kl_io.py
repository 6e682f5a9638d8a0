"""Loading and saving diffusers ``AutoencoderKL`` folders (weights only, no pickle).

A folder holds ``config.json`` (diffusers' AutoencoderKL config) and
``diffusion_pytorch_model.safetensors``; a Stable Diffusion pipeline keeps one under ``vae/``.
``load_autoencoder_kl`` reads it into the Flax ``AutoencoderKL`` (module, params, config);
``save_autoencoder_kl`` writes the same layout, which ``diffusers.AutoencoderKL.from_pretrained``
loads. The order of the checks is the order of the costs: the config is parsed and every
option the Flax networks cannot represent is refused by name before any weight is read; a
``diffusion_pytorch_model.bin`` (a pickle) is never unpickled; then every key and shape is
compared with the Flax tree, and a mismatch names the key.

Renaming (``flax_params_from_diffusers``): the diffusers key ``decoder.up_blocks.0.resnets.1
.conv1.weight`` is the Flax path ``decoder/up_blocks_0/resnets_1/conv1/kernel``: each
``.<i>`` joins the name before it, ``weight`` becomes ``kernel`` (Conv: OIHW -> HWIO; Linear:
[out, in] -> [in, out]) or ``scale`` (GroupNorm, the 1-D weights). Attention weights saved
under diffusers' pre-0.14 names (``query``, ``key``, ``value``, ``proj_attn``) are renamed as
diffusers itself does when it loads them.
"""

from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from diffax_lab.models.torch_layout import flax_leaf, torch_leaf
from diffax_lab.models.vae import AutoencoderKL, AutoencoderKLConfig

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
PICKLE_NAME = "diffusion_pytorch_model.bin"
# diffusers' pre-0.14 attention names -> current ones (its _convert_deprecated_attention_blocks).
DEPRECATED_ATTENTION = {
    "query": "to_q",
    "key": "to_k",
    "value": "to_v",
    "proj_attn": "to_out.0",
}


class AutoencoderKLLoadError(ValueError):
    pass


def _rename_deprecated(key: str) -> str:
    parts = key.split(".")
    if "attentions" in parts and len(parts) >= 2 and parts[-2] in DEPRECATED_ATTENTION:
        parts[-2] = DEPRECATED_ATTENTION[parts[-2]]
        return ".".join(parts)
    return key


def _flax_key(key: str, value: np.ndarray):
    """(Flax path, value in Flax layout) for one diffusers state-dict entry."""
    key = _rename_deprecated(key)
    *path, leaf = re.sub(r"\.(\d+)(?=\.)", r"_\1", key).split(".")
    if leaf == "weight":
        if "attentions_0" in path and value.ndim == 4:  # 1x1-conv attention of old checkpoints
            value = value[:, :, 0, 0]
        leaf, value = flax_leaf(tuple(path), value)  # Conv, Linear, GroupNorm
    return (*path, leaf), value


def flax_params_from_diffusers(state_dict: dict) -> dict:
    """Nested Flax params (float32) from a diffusers AutoencoderKL state dict (numpy)."""
    flat = {}
    for k, v in state_dict.items():
        path, value = _flax_key(k, np.asarray(v, np.float32))
        flat[path] = value
    return traverse_util.unflatten_dict(flat)


def diffusers_state_dict_from_flax(params) -> dict:
    """The inverse of ``flax_params_from_diffusers``: diffusers names, float32 numpy."""
    out = {}
    for path, v in traverse_util.flatten_dict(params).items():
        v = np.asarray(v, np.float32)
        *mods, leaf = path
        leaf, v = torch_leaf(leaf, v)
        key = re.sub(r"_(\d+)(?=\.)", r".\1", ".".join((*mods, leaf)))
        out[key] = np.ascontiguousarray(v)
    return out


def abstract_params(config: AutoencoderKLConfig):
    """The Flax parameter tree's shapes (no memory, no compute)."""
    model = AutoencoderKL(config)
    f = config.downsample_factor
    x = jax.ShapeDtypeStruct((1, f, f, config.in_channels), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)["params"]


def check_params(params, config: AutoencoderKLConfig, source: str) -> None:
    """Raises AutoencoderKLLoadError naming the first missing, unexpected or mis-shaped key
    (in diffusers' spelling, with the shape in diffusers' layout)."""
    want = diffusers_state_dict_from_flax(
        jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32), abstract_params(config))
    )
    have = diffusers_state_dict_from_flax(params)
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    if missing or unexpected:
        raise AutoencoderKLLoadError(
            f"{source} does not match its config: missing keys {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}."
        )
    for k in sorted(want):
        if want[k].shape != have[k].shape:
            raise AutoencoderKLLoadError(
                f"{source}: {k} has shape {tuple(have[k].shape)}, but the config "
                f"(block_out_channels, latent_channels, in/out_channels) needs "
                f"{tuple(want[k].shape)}."
            )


def read_config(path: str) -> AutoencoderKLConfig:
    """The parsed, validated config of a diffusers AutoencoderKL folder."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise AutoencoderKLLoadError(
            f"{path} has no config.json; a diffusers AutoencoderKL folder holds config.json "
            f"and {WEIGHTS_NAME} (a pipeline keeps them under vae/)."
        )
    with open(cfg_path) as f:
        d = json.load(f)
    try:
        return AutoencoderKLConfig.from_diffusers_dict(d)
    except ValueError as e:
        raise AutoencoderKLLoadError(f"{cfg_path}: {e}") from e


def load_autoencoder_kl(path: str, dtype=jnp.float32):
    """(AutoencoderKL module, params, config) from a diffusers AutoencoderKL folder.

    ``dtype`` is the compute dtype; a config with ``force_upcast`` (diffusers' flag for VAEs
    that overflow in float16) keeps float32, as diffusers' pipelines do.
    """
    if not os.path.isdir(path):
        raise AutoencoderKLLoadError(f"{path} is not a directory (want a diffusers VAE folder).")
    config = read_config(path)
    weights = os.path.join(path, WEIGHTS_NAME)
    if not os.path.exists(weights):
        if os.path.exists(os.path.join(path, PICKLE_NAME)):
            raise AutoencoderKLLoadError(
                f"{path} has only {PICKLE_NAME}, a pickle this lab never loads. Convert it once "
                'where you trust it: python -c "import sys; from diffusers import AutoencoderKL; '
                "AutoencoderKL.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[1], "
                f'safe_serialization=True)" {path}'
            )
        raise AutoencoderKLLoadError(f"{path} has config.json but no {WEIGHTS_NAME}.")
    # The flax reader also takes bfloat16 files, which numpy cannot hold.
    from safetensors.flax import load_file

    params = flax_params_from_diffusers(load_file(weights))
    check_params(params, config, weights)
    if config.force_upcast and dtype != jnp.float32:
        logging.info("%s: force_upcast=True, so the VAE computes in float32.", path)
        dtype = jnp.float32
    params = jax.tree_util.tree_map(jnp.asarray, params)
    return AutoencoderKL(config, dtype), params, config


def save_autoencoder_kl(path: str, config: AutoencoderKLConfig, params) -> None:
    """config.json + diffusion_pytorch_model.safetensors in diffusers' layout."""
    from safetensors.numpy import save_file

    check_params(params, config, "params")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config.to_diffusers_dict(), f, indent=2)
    save_file(
        diffusers_state_dict_from_flax(params),
        os.path.join(path, WEIGHTS_NAME),
        metadata={"format": "pt"},
    )
