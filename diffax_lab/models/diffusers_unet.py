"""diffusers ``UNet2DModel`` folders <-> the lab's U-Net, both ways, without torch.

- ``load_unet2d(path)`` reads ``config.json`` + ``diffusion_pytorch_model.safetensors`` (a
  UNet folder, or a pipeline folder holding ``unet/``) and returns the lab's ``UNet``, its
  parameters ``{"params": ...}`` and a ``DiffusersUNetInfo``. The network is built with
  ``time_scale = T`` and ``time_index_offset = 1``, so the lab's step i (t = (i + 1) / T)
  is embedded as i, as diffusers' schedulers feed it.
- ``export_unet2d`` / ``export_pipeline`` write the lab's U-Net (any architecture that maps)
  as a folder that ``UNet2DModel.from_pretrained`` (and ``DDPMPipeline.from_pretrained``)
  loads; ``scheduler_config`` gives the matching ``DDPMScheduler`` configuration.
- The config mappings (``unet_config_to_lab``, ``lab_to_unet_config``,
  ``scheduler_config``, ``scheduler_config_to_lab``) live in ``diffusers_config.py``.

Everything the lab's U-Net cannot represent is refused by the field's name before any
weight is read. Legacy attention names (``query``/``key``/``value``/``proj_attn``, still in
old checkpoints such as google/ddpm-cifar10-32) load as diffusers' own loader converts them
(``ModelMixin._convert_deprecated_attention_blocks``). Pickle files are never loaded.

Not for: other diffusers models (UNet2DConditionModel, VAEs), or sampling: schedules and
samplers stay in ``diffax_lab.diffusion``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from diffax_lab.models.diffusers_config import (
    DiffusersFormatError,
    lab_to_unet_config,
    refuse,
    scheduler_config,
    scheduler_config_to_lab,
    unet_config_to_lab,
)
from diffax_lab.models.torch_layout import kernel_from_torch, kernel_to_torch
from diffax_lab.models.unet import UNet

__all__ = [
    "DiffusersFormatError",
    "DiffusersUNetInfo",
    "describe_unet2d",
    "export_pipeline",
    "export_unet2d",
    "load_unet2d",
    "pickle_refusal",
    "scheduler_config",
    "scheduler_config_to_lab",
]

WEIGHTS_NAME = "diffusion_pytorch_model"
# diffusers' names of an attention block's projections -> the legacy ones of old checkpoints.
LEGACY_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
_ATTENTION_KEY = re.compile(r"(.*\.attentions\.\d+)\.(to_q|to_k|to_v|to_out\.0)\.(weight|bias)$")


def _legacy_name(key: str) -> str:
    """The pre-0.14 name of an attention projection key (unchanged for any other key)."""
    m = _ATTENTION_KEY.match(key)
    return f"{m[1]}.{LEGACY_ATTENTION[m[2]]}.{m[3]}" if m else key


@dataclasses.dataclass
class DiffusersUNetInfo:
    source: str  # the folder given
    weights_file: str  # the safetensors file read (the first shard if sharded)
    config: dict  # config.json as read
    unet_kwargs: dict  # the lab UNet's constructor arguments (dtype excluded)
    in_channels: int
    sample_size: Any  # int, [H, W] or None: the size the checkpoint was trained at
    num_train_timesteps: int  # T, which sets time_scale
    num_train_timesteps_from: str  # where T came from (scheduler_config.json, argument, default)
    legacy_attention_names: bool  # query/key/value/proj_attn were renamed on load
    scheduler: dict | None  # scheduler_config_to_lab(scheduler_config.json) if there is one
    unet_dir: str = ""  # the folder holding config.json (path, or path/unet)
    scheduler_file: str | None = None  # the scheduler_config.json read, if any


# ---------------------------------------------------------------- parameter names


_TOP = [
    (re.compile(r"down(\d+)_res(\d+)$"), lambda m, n: f"down_blocks.{m[1]}.resnets.{m[2]}"),
    (re.compile(r"down(\d+)_attn(\d+)$"), lambda m, n: f"down_blocks.{m[1]}.attentions.{m[2]}"),
    (re.compile(r"down(\d+)_downsample$"), lambda m, n: f"down_blocks.{m[1]}.downsamplers.0"),
    (
        re.compile(r"up(\d+)_res(\d+)$"),
        lambda m, n: f"up_blocks.{n - 1 - int(m[1])}.resnets.{m[2]}",
    ),
    (
        re.compile(r"up(\d+)_attn(\d+)$"),
        lambda m, n: f"up_blocks.{n - 1 - int(m[1])}.attentions.{m[2]}",
    ),
    (re.compile(r"up(\d+)_upsample$"), lambda m, n: f"up_blocks.{n - 1 - int(m[1])}.upsamplers.0"),
    (re.compile(r"mid_res(\d+)$"), lambda m, n: f"mid_block.resnets.{m[1]}"),
    (re.compile(r"mid_attn$"), lambda m, n: "mid_block.attentions.0"),
    (re.compile(r"conv_in$"), lambda m, n: "conv_in"),
    (re.compile(r"conv_out$"), lambda m, n: "conv_out"),
    (re.compile(r"norm_out$"), lambda m, n: "conv_norm_out"),
    (re.compile(r"time_dense0$"), lambda m, n: "time_embedding.linear_1"),
    (re.compile(r"time_dense1$"), lambda m, n: "time_embedding.linear_2"),
    (re.compile(r"class_embed$"), lambda m, n: "class_embedding"),
]
_INNER = {"emb_proj": "time_emb_proj", "skip": "conv_shortcut", "norm": "group_norm"}
_INNER["out"] = "to_out.0"  # the attention block's output projection
_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


@dataclasses.dataclass(frozen=True)
class _Entry:
    lab_path: tuple  # path in params["params"]
    keys: tuple  # diffusers keys (three for the fused qkv)
    torch_shape: tuple  # each key's shape in the diffusers file


def _torch_shape(shape, leaf: str, parts: int) -> tuple:
    if leaf == "kernel" and len(shape) == 4:  # conv [kh, kw, in, out] -> [out, in, kh, kw]
        shape = (shape[3], shape[2], shape[0], shape[1])
    elif leaf == "kernel":  # dense [in, out] -> [out, in]
        shape = (shape[1], shape[0])
    if parts > 1:  # fused qkv: the output axis is [q | k | v]
        shape = (shape[0] // parts,) + tuple(shape[1:])
    return tuple(shape)


def _entries(param_shapes: dict, num_levels: int) -> list[_Entry]:
    """One entry per lab parameter, with its diffusers key(s) and their shape."""
    out = []
    for path, leaf_shape in traverse_util.flatten_dict(param_shapes).items():
        for pattern, fn in _TOP:
            m = pattern.match(path[0])
            if m:
                prefix = fn(m, num_levels)
                break
        else:
            refuse(f"The lab U-Net's parameter {'/'.join(path)} has no UNet2DModel counterpart.")
        inner, leaf = list(path[1:-1]), path[-1]
        if inner and inner[-1] == "norm" and leaf in ("scale", "bias"):
            inner = inner[:-1]  # layers.GroupNorm(name=X) holds nn.GroupNorm "norm": X.weight
        if inner == ["qkv"]:
            keys = tuple(f"{prefix}.{k}.{_LEAF[leaf]}" for k in ("to_q", "to_k", "to_v"))
        else:
            keys = (".".join([prefix] + [_INNER.get(p, p) for p in inner] + [_LEAF[leaf]]),)
        out.append(_Entry(path, keys, _torch_shape(tuple(leaf_shape.shape), leaf, len(keys))))
    return out


def _to_lab(arrays: list[np.ndarray], leaf: str) -> np.ndarray:
    if leaf == "kernel":
        arrays = [kernel_from_torch(a) for a in arrays]
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=-1)


def _to_torch(array: np.ndarray, leaf: str, parts: int) -> list[np.ndarray]:
    pieces = np.split(array, parts, axis=-1) if parts > 1 else [array]
    if leaf == "kernel":
        pieces = [kernel_to_torch(p) for p in pieces]
    return [np.ascontiguousarray(p, np.float32) for p in pieces]


def _time_shift_matrix(model: UNet, delta: float, max_period: float = 10000.0) -> np.ndarray:
    """M [D, D] with emb(s + delta) = emb(s) @ M for the U-Net's sinusoid (float64).

    sin((s + d) w) = sin(s w) cos(d w) + cos(s w) sin(d w) and
    cos((s + d) w) = cos(s w) cos(d w) - sin(s w) sin(d w): a rotation per frequency, so a
    shift of the embedded time folds exactly into the first time Dense layer.
    """
    dim = model.base_channels
    half = dim // 2
    denom = half - model.time_freq_shift
    denom = denom if denom > 0 else 1.0
    w = np.exp(-math.log(max_period) * np.arange(half) / denom)
    c, s = np.cos(delta * w), np.sin(delta * w)
    sin_i = np.arange(half) + (half if model.time_flip_sin_to_cos else 0)
    cos_i = np.arange(half) + (0 if model.time_flip_sin_to_cos else half)
    m = np.eye(dim)  # an odd dim's zero pad column stays as it is
    m[sin_i, sin_i], m[cos_i, sin_i] = c, s
    m[cos_i, cos_i], m[sin_i, cos_i] = c, -s
    return m


# ---------------------------------------------------------------- files


def _find_unet_dir(path: str) -> str:
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    if os.path.isfile(os.path.join(path, "unet", "config.json")):
        return os.path.join(path, "unet")
    refuse(
        f"{path}: no config.json (nor unet/config.json); pass a folder written by "
        "UNet2DModel.save_pretrained or a pipeline folder that holds unet/."
    )


def _find_scheduler_config(path: str, unet_dir: str) -> str | None:
    for cand in (
        os.path.join(unet_dir, "scheduler_config.json"),
        os.path.join(path, "scheduler_config.json"),
        os.path.join(path, "scheduler", "scheduler_config.json"),
        os.path.join(
            os.path.dirname(os.path.normpath(unet_dir)), "scheduler", "scheduler_config.json"
        ),
    ):
        if os.path.isfile(cand):
            return cand
    return None


def pickle_refusal(bin_path: str) -> str:
    """The refusal of a pickle checkpoint, with the one-line command that converts it."""
    out = bin_path[: -len(".bin")] + ".safetensors"
    return (
        f"{bin_path} is a pickle, which diffax_lab never loads (unpickling runs code). "
        "Convert it once, where you trust the file, with: "
        f"python -c \"import torch, safetensors.torch as st; st.save_file(torch.load('{bin_path}', "
        f"map_location='cpu', weights_only=True), '{out}')\""
    )


def _weight_files(unet_dir: str, variant: str | None) -> list[str]:
    stem = WEIGHTS_NAME + (f".{variant}" if variant else "")
    single = os.path.join(unet_dir, stem + ".safetensors")
    index = single + ".index.json"
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(unet_dir, s) for s in shards]
    pickle_path = os.path.join(unet_dir, stem + ".bin")
    if os.path.isfile(pickle_path):
        refuse(pickle_refusal(pickle_path))
    refuse(f"{unet_dir}: no {stem}.safetensors (nor a sharded {stem}.safetensors.index.json).")


def _read_header(files: list[str]) -> dict[str, tuple[str, tuple]]:
    """key -> (file, shape), from the safetensors headers only (no tensor is read)."""
    from safetensors import safe_open  # noqa: PLC0415

    out = {}
    for fname in files:
        with safe_open(fname, framework="flax") as f:
            for k in f.keys():
                out[k] = (fname, tuple(f.get_slice(k).get_shape()))
    return out


def _read_tensors(plan: dict[str, str]) -> dict[str, np.ndarray]:
    from safetensors import safe_open  # noqa: PLC0415

    by_file: dict[str, list[str]] = {}
    for key, fname in plan.items():
        by_file.setdefault(fname, []).append(key)
    out = {}
    for fname, keys in by_file.items():
        with safe_open(fname, framework="flax") as f:  # "flax" reads bfloat16 too
            for k in keys:
                out[k] = np.asarray(f.get_tensor(k), np.float32)
    return out


# ---------------------------------------------------------------- load and export


def _param_shapes(model: UNet, in_channels: int) -> dict:
    size = 2 ** (len(model.channel_mult) - 1)
    x = jnp.zeros((1, size, size, in_channels))
    t = jnp.zeros((1,))
    y = jnp.zeros((1,), jnp.int32) if model.num_classes else None
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, t, y))
    return shapes["params"]


def describe_unet2d(path: str, *, num_train_timesteps: int | None = None) -> DiffusersUNetInfo:
    """What ``load_unet2d(path)`` would build, from the config files alone (no weight is
    read; ``weights_file`` is ''): the lab U-Net's arguments and the scheduler's settings.
    Refuses, by field name, a config.json the lab's U-Net cannot represent."""
    unet_dir = _find_unet_dir(path)
    with open(os.path.join(unet_dir, "config.json")) as f:
        config = json.load(f)
    sched_path = _find_scheduler_config(path, unet_dir)
    sched = None
    if sched_path:
        with open(sched_path) as f:
            sched_raw = json.load(f)
        try:
            sched = scheduler_config_to_lab(sched_raw)
        except DiffusersFormatError as e:  # the network still loads; the schedule is the user's
            sched = {"unsupported": str(e), "num_timesteps": sched_raw.get("num_train_timesteps")}
    if num_train_timesteps is not None:
        T, T_from = int(num_train_timesteps), "argument"
    elif sched and sched.get("num_timesteps"):
        T, T_from = int(sched["num_timesteps"]), sched_path
    else:
        T, T_from = 1000, "default (no scheduler_config.json found)"
    return DiffusersUNetInfo(
        source=path,
        weights_file="",
        config=config,
        unet_kwargs=unet_config_to_lab(config, T),
        in_channels=int(config.get("in_channels", 3)),
        sample_size=config.get("sample_size"),
        num_train_timesteps=T,
        num_train_timesteps_from=T_from,
        legacy_attention_names=False,
        scheduler=sched,
        unet_dir=unet_dir,
        scheduler_file=sched_path,
    )


def load_unet2d(
    path: str,
    *,
    num_train_timesteps: int | None = None,
    variant: str | None = None,
    dtype: Any = jnp.float32,
) -> tuple[UNet, dict, DiffusersUNetInfo]:
    """(UNet, {"params": ...}, info) from a diffusers UNet2DModel folder (or pipeline).

    T (``num_train_timesteps``, which sets ``time_scale``) is the argument if given, else
    the scheduler_config.json beside the UNet's, else 1000 (``info`` says which).
    Everything is checked (config fields, then every key and shape in the safetensors
    header) before any weight is read.
    """
    described = describe_unet2d(path, num_train_timesteps=num_train_timesteps)
    unet_dir, kwargs = described.unet_dir, described.unet_kwargs
    in_channels = described.in_channels
    model = UNet(**kwargs, dtype=dtype)
    entries = _entries(_param_shapes(model, in_channels), len(kwargs["channel_mult"]))

    files = _weight_files(unet_dir, variant)
    header = _read_header(files)
    plan, legacy, missing, wrong = {}, False, [], []
    for e in entries:
        for key in e.keys:
            src = key if key in header else _legacy_name(key)
            if src not in header:
                missing.append(key)
                continue
            legacy = legacy or src != key
            if header[src][1] != e.torch_shape:
                wrong.append(
                    f"{src}: file has {list(header[src][1])}, config.json gives "
                    f"{list(e.torch_shape)} (lab parameter {'/'.join(e.lab_path)})"
                )
            plan[src] = header[src][0]
    unexpected = sorted(set(header) - set(plan))
    if missing or wrong or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}" + (" ..." if len(missing) > 8 else ""))
        if wrong:
            parts.append("shape mismatches: " + "; ".join(wrong[:8]))
        if unexpected:
            parts.append(
                f"unexpected keys {unexpected[:8]}" + (" ..." if len(unexpected) > 8 else "")
            )
        refuse(
            f"{files[0]} does not match its config.json: " + "; ".join(parts) + ". The "
            "weights and config.json must come from the same save_pretrained; fix the "
            "config field that sets these shapes (block_out_channels, layers_per_block, "
            "block types, in/out_channels, num_class_embeds) or re-save the model."
        )

    tensors = _read_tensors(plan)
    flat = {}
    for e in entries:
        arrays = []
        for key in e.keys:
            key = key if key in tensors else _legacy_name(key)
            arrays.append(tensors[key])
        flat[e.lab_path] = jnp.asarray(_to_lab(arrays, e.lab_path[-1]), jnp.float32)
    params = {"params": traverse_util.unflatten_dict(flat)}
    info = dataclasses.replace(described, weights_file=files[0], legacy_attention_names=legacy)
    return model, params, info


def _diffusers_version() -> str:
    try:
        import diffusers  # noqa: PLC0415

        return diffusers.__version__
    except ImportError:
        return "0.30.0"  # the format is older than this; from_pretrained only reads it


def export_unet2d(
    model: UNet,
    params,
    out_dir: str,
    *,
    num_train_timesteps: int,
    sample_size=None,
) -> dict:
    """Writes ``out_dir/config.json`` and ``diffusion_pytorch_model.safetensors``.

    diffusers feeds the network step i as the number i; the lab's network at step i sees
    ``time_scale * (i + 1) / T - time_index_offset``. With ``time_scale == T`` the two
    differ by the constant delta = 1 - time_index_offset, which is folded exactly into the
    first time layer (``_time_shift_matrix``): ``UNet2DModel(x, i)`` then equals the lab's
    ``model(x, t=(i + 1) / T)``. Returns the config written.
    """
    from safetensors.numpy import save_file  # noqa: PLC0415

    T = int(num_train_timesteps)
    if model.time_scale != T:
        refuse(
            f"Cannot export: model.time_scale={model.time_scale} differs from "
            f"num_train_timesteps={T}; diffusers embeds the step index itself, so only "
            "time_scale == T maps exactly."
        )
    tree = params.get("params", params)
    in_channels = int(tree["conv_in"]["kernel"].shape[2])
    config = lab_to_unet_config(model, in_channels, sample_size)
    entries = _entries(
        jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree),
        len(model.channel_mult),
    )
    flat = traverse_util.flatten_dict(tree)
    delta = 1.0 - model.time_index_offset
    tensors = {}
    for e in entries:
        value = np.asarray(flat[e.lab_path], np.float64)
        if e.lab_path == ("time_dense0", "kernel") and delta != 0.0:
            value = _time_shift_matrix(model, delta) @ value
        for key, arr in zip(e.keys, _to_torch(value, e.lab_path[-1], len(e.keys)), strict=True):
            tensors[key] = arr
    os.makedirs(out_dir, exist_ok=True)
    config = {**config, "_diffusers_version": _diffusers_version()}
    save_file(tensors, os.path.join(out_dir, WEIGHTS_NAME + ".safetensors"))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return config


def export_pipeline(
    model: UNet,
    params,
    out_dir: str,
    *,
    schedule: str,
    num_timesteps: int,
    prediction: str = "eps",
    clip_x0: float | None = 1.0,
    variance: str = "beta_tilde",
    sample_size=None,
) -> None:
    """A ``DDPMPipeline`` folder: model_index.json, unet/ (``export_unet2d``) and
    scheduler/scheduler_config.json (``scheduler_config``)."""
    sched = scheduler_config(schedule, num_timesteps, prediction, clip_x0, variance)
    export_unet2d(
        model,
        params,
        os.path.join(out_dir, "unet"),
        num_train_timesteps=num_timesteps,
        sample_size=sample_size,
    )
    version = _diffusers_version()
    os.makedirs(os.path.join(out_dir, "scheduler"), exist_ok=True)
    with open(os.path.join(out_dir, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump({**sched, "_diffusers_version": version}, f, indent=2)
    index = {
        "_class_name": "DDPMPipeline",
        "_diffusers_version": version,
        "scheduler": ["diffusers", "DDPMScheduler"],
        "unet": ["diffusers", "UNet2DModel"],
    }
    with open(os.path.join(out_dir, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)


def lab_config_fields(info: DiffusersUNetInfo) -> dict[str, Any]:
    """The lab config fields (dotted names) a diffusers folder sets: the model section from
    config.json, data.channels / data.image_size, and the diffusion and sample settings of
    its scheduler_config.json. Refuses what the lab's config cannot hold, by field name."""
    kw = info.unet_kwargs
    if kw["out_channels"] != info.in_channels:
        refuse(
            f"{info.unet_dir}/config.json: out_channels={kw['out_channels']} differs from "
            f"in_channels={info.in_channels}; the lab's denoiser predicts as many channels as "
            "it takes (a learned variance's extra channels are not supported)."
        )
    fields: dict[str, Any] = {"model.name": "unet", "data.channels": info.in_channels}
    for name, value in kw.items():
        if name != "out_channels":
            fields["model." + name] = tuple(value) if isinstance(value, list | tuple) else value
    size = info.sample_size
    if isinstance(size, list | tuple):
        if len(set(size)) != 1:
            refuse(f"{info.unet_dir}/config.json: sample_size={size} is not square.")
        size = size[0]
    if size:
        fields["data.image_size"] = int(size)
    s = info.scheduler
    if s and "unsupported" in s:
        refuse(
            f"{info.scheduler_file}: {s['unsupported']} Remove the scheduler config to keep "
            "the lab's diffusion section, or retrain with a supported schedule."
        )
    fields["diffusion.num_timesteps"] = info.num_train_timesteps
    if s:
        fields["diffusion.schedule"] = s["schedule"]
        fields["diffusion.prediction"] = s["prediction"]
        fields["sample.clip_x0"] = float(s["clip_x0"] or 0.0)
        if s["variance"] is not None:
            fields["sample.variance"] = s["variance"]
    return fields
