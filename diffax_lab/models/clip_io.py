"""Loading and saving CLIP checkpoints in Hugging Face's layout (weights only, no pickle).

A CLIP directory holds ``config.json`` (Hugging Face CLIPConfig), ``model.safetensors``
(or ``flax_model.msgpack``) and the tokenizer files (``tokenizer.json``, or ``vocab.json``
and ``merges.txt``). ``load_clip`` takes such a directory, or a hub id when the machine is
online (only those files are fetched). A ``pytorch_model.bin`` is never unpickled: convert
it to safetensors first. ``save_clip`` writes the same layout, so a CLIP trained here loads
wherever a pretrained one does.

Renaming (``flax_params_from_hf``): the Hugging Face key ``a.b.layers.3.c.weight`` is the
Flax path ``a/b/layers_3/c/<leaf>`` where a ``weight`` becomes ``kernel`` (Dense:
transposed; Conv: OIHW -> HWIO), ``scale`` (LayerNorm, the 1-D weights) or ``embedding``
(``*_embedding`` tables). Buffers (``position_ids``) are dropped.
"""

from __future__ import annotations

import json
import os
import re

import jax.numpy as jnp
import numpy as np
from flax import serialization, traverse_util

from diffax_lab.models.clip import CLIP, CLIPConfig
from diffax_lab.models.torch_layout import flax_leaf, torch_leaf

WEIGHT_FILES = ("model.safetensors", "flax_model.msgpack")
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))


class CLIPLoadError(FileNotFoundError):
    pass


def _flax_key(hf_key: str, value: np.ndarray):
    parts = re.sub(r"\.layers\.(\d+)\.", r".layers_\1.", hf_key).split(".")
    *path, leaf = parts
    if leaf == "weight":
        leaf, value = flax_leaf(tuple(path), value)  # Conv, Dense, LayerNorm, embeddings
    return (*path, leaf), value


def flax_params_from_hf(state_dict: dict) -> dict:
    """Nested Flax params from a Hugging Face CLIPModel state dict (numpy arrays)."""
    flat = {}
    for k, v in state_dict.items():
        if k.endswith("position_ids"):
            continue
        key, value = _flax_key(k, np.asarray(v))
        flat[key] = jnp.asarray(value, jnp.float32)
    return traverse_util.unflatten_dict(flat)


def hf_state_dict_from_flax(params) -> dict:
    """The inverse of ``flax_params_from_hf``: Hugging Face names, float32 numpy."""
    out = {}
    for path, v in traverse_util.flatten_dict(params).items():
        v = np.asarray(v, np.float32)
        *mods, leaf = path
        leaf, v = torch_leaf(leaf, v)
        key = ".".join((*mods, leaf))
        # np.array, not np.ascontiguousarray: the latter turns the scalar logit_scale 1-D.
        out[re.sub(r"\.layers_(\d+)\.", r".layers.\1.", key)] = np.array(v, order="C")
    return out


def _check_dir(path: str) -> str:
    missing = []
    if not os.path.exists(os.path.join(path, "config.json")):
        missing.append("config.json")
    weights = [f for f in WEIGHT_FILES if os.path.exists(os.path.join(path, f))]
    if not weights:
        if os.path.exists(os.path.join(path, "pytorch_model.bin")):
            raise CLIPLoadError(
                f"{path} has only pytorch_model.bin, a pickle this lab never loads. Convert it "
                "once where you trust it: `CLIPModel.from_pretrained(dir).save_pretrained(dir, "
                "safe_serialization=True)` writes model.safetensors."
            )
        missing.append(" or ".join(WEIGHT_FILES))
    if missing:
        raise CLIPLoadError(
            f"{path} is not a complete CLIP directory: missing {', '.join(missing)}. It needs "
            "config.json, model.safetensors (or flax_model.msgpack) and the tokenizer files "
            "(tokenizer.json, or vocab.json + merges.txt)."
        )
    return weights[0]


def resolve(path_or_id: str) -> str:
    """A local directory, or a hub id fetched (config, safetensors, tokenizer) when online."""
    if os.path.isdir(path_or_id):
        return path_or_id
    if os.path.exists(path_or_id) or path_or_id.startswith((".", "/")):
        raise CLIPLoadError(f"{path_or_id} is not a directory.")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(
            path_or_id,
            allow_patterns=[
                "config.json",
                "*.safetensors",
                "tokenizer*",
                "vocab.json",
                "merges.txt",
                "special_tokens_map.json",
            ],
        )
    except Exception as e:  # offline, unknown id, no huggingface_hub
        raise CLIPLoadError(
            f"Could not fetch CLIP {path_or_id!r} from the Hugging Face hub ({e}). Offline, "
            "pass a local directory with config.json, model.safetensors and tokenizer files."
        ) from e


def load_clip(path_or_id: str, dtype=jnp.float32):
    """(CLIP module, params, CLIPConfig) from a directory or hub id."""
    path = resolve(path_or_id)
    weights = _check_dir(path)
    with open(os.path.join(path, "config.json")) as f:
        config = CLIPConfig.from_hf_dict(json.load(f))
    if weights == "model.safetensors":
        from safetensors.numpy import load_file

        params = flax_params_from_hf(load_file(os.path.join(path, weights)))
    else:
        with open(os.path.join(path, weights), "rb") as f:
            params = serialization.msgpack_restore(f.read())
        params = params.get("params", params)
    return CLIP(config, dtype), params, config


def save_clip(path: str, config: CLIPConfig, params) -> None:
    """config.json + model.safetensors in Hugging Face's layout (tokenizer: save it too)."""
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config.to_hf_dict(), f, indent=2)
    save_file(hf_state_dict_from_flax(params), os.path.join(path, "model.safetensors"))


def tokenize(tokenizer, texts, length: int) -> tuple[np.ndarray, np.ndarray]:
    """(int32 ids [N, length], int32 attention mask [N, length]) of ``texts``, padded and
    truncated to the text encoder's context length."""
    out = tokenizer(
        list(texts), padding="max_length", max_length=length, truncation=True, return_tensors="np"
    )
    return out["input_ids"].astype(np.int32), out["attention_mask"].astype(np.int32)


def load_tokenizer(path: str):
    """The CLIP tokenizer (transformers' CLIPTokenizerFast) from the same directory."""
    if not any(all(os.path.exists(os.path.join(path, f)) for f in fs) for fs in TOKENIZER_FILES):
        raise CLIPLoadError(
            f"{path} has no tokenizer: it needs tokenizer.json, or vocab.json and merges.txt."
        )
    try:
        from transformers import CLIPTokenizerFast
    except ImportError as e:
        raise CLIPLoadError("The CLIP tokenizer needs `pip install -e .[clip]`.") from e
    return CLIPTokenizerFast.from_pretrained(path)
