"""Config mappings between diffusers and the lab: ``UNet2DModel``'s config.json <-> the
lab ``UNet``'s constructor arguments, and ``DDPMScheduler``'s config <-> the lab's
diffusion settings (schedule, T, prediction type, clipping, variance).

Each mapping refuses, by the field's name and with the fix, whatever the other side cannot
represent exactly. ``diffusers_unet.py`` moves the weights; nothing here reads a tensor or
imports torch or diffusers.

Not for: the maths of schedules (``diffusion/schedules.py``; a test checks that the
scheduler configs written here give the same alphas_cumprod).
"""

from __future__ import annotations

import numpy as np

from diffax_lab.models.unet import UNet

DOWN_BLOCKS = {"DownBlock2D": False, "AttnDownBlock2D": True}  # type -> has attention
UP_BLOCKS = {"UpBlock2D": False, "AttnUpBlock2D": True}
# diffusers' get_activation names -> the lab's ACTIVATIONS (torch.nn.GELU is the erf form).
ACT_FROM_DIFFUSERS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu_exact",
    "relu": "relu",
    "mish": "mish",
}
ACT_TO_DIFFUSERS = {"silu": "silu", "gelu_exact": "gelu", "relu": "relu", "mish": "mish"}
PREDICTION_FROM_DIFFUSERS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
PREDICTION_TO_DIFFUSERS = {v: k for k, v in PREDICTION_FROM_DIFFUSERS.items()}
VARIANCE_TO_DIFFUSERS = {"beta_tilde": "fixed_small", "beta": "fixed_large"}
# DDPM's linear betas at T = 1000 (Ho et al. 2020, section 4), as diffusion/schedules.py;
# the lab scales them by 1000 / T. (models/ does not import diffusion/: sibling layers.)
LINEAR_BETA_START, LINEAR_BETA_END = 1e-4, 0.02
# Fields of config.json that describe no weights or are handled outside the network.
IGNORED_FIELDS = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")

# Fields mapped onto the lab U-Net's options (``num_train_timesteps`` is the "learned"
# time embedding's table size, unused by "positional").
MAPPED_FIELDS = (
    "sample_size in_channels out_channels center_input_sample time_embedding_dim freq_shift "
    "flip_sin_to_cos down_block_types up_block_types block_out_channels layers_per_block "
    "downsample_padding dropout act_fn attention_head_dim norm_num_groups "
    "attn_norm_num_groups norm_eps add_attention num_class_embeds num_train_timesteps"
).split()
# (field, the only value the lab's U-Net represents): refused when set otherwise.
FIXED_FIELDS = {
    "time_embedding_type": "positional",
    "mid_block_type": "UNetMidBlock2D",
    "mid_block_scale_factor": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "resnet_time_scale_shift": "default",
    "class_embed_type": None,
}


class DiffusersFormatError(ValueError):
    """A diffusers folder the lab cannot load (or a U-Net it cannot export), with the fix."""


# ---------------------------------------------------------------- configs


def refuse(msg: str):
    """Raises the DiffusersFormatError that says what is unsupported and the fix."""
    raise DiffusersFormatError(msg)


def unet_config_to_lab(config: dict, num_train_timesteps: int = 1000) -> dict:
    """The lab ``UNet`` kwargs for a ``UNet2DModel`` config.json (refusing, by field name,
    anything the lab's U-Net cannot represent)."""
    c = dict(config)
    name = c.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        refuse(f"config.json describes a {name}, not a UNet2DModel; only UNet2DModel loads.")
    unknown = sorted(set(c) - set(IGNORED_FIELDS) - set(FIXED_FIELDS) - set(MAPPED_FIELDS))
    if unknown:
        refuse(
            f"config.json has fields {unknown} that this loader does not know, so it cannot "
            "tell whether the lab's U-Net represents them; remove them if they are at their "
            "defaults, or extend diffax_lab/models/diffusers_config.py."
        )
    for field, only in FIXED_FIELDS.items():
        if c.get(field, only) != only:
            refuse(
                f"config.json: {field}={c[field]!r} is not supported; the lab's U-Net "
                f"represents only {field}={only!r}."
            )

    widths = list(c.get("block_out_channels", (224, 448, 672, 896)))
    down = list(c.get("down_block_types", DEFAULT_DOWN))
    up = list(c.get("up_block_types", DEFAULT_UP))
    down = [t[len("UNetRes") :] if t.startswith("UNetRes") else t for t in down]
    up = [t[len("UNetRes") :] if t.startswith("UNetRes") else t for t in up]
    for kind, types, table in (("down", down, DOWN_BLOCKS), ("up", up, UP_BLOCKS)):
        for t in types:
            if t not in table:
                refuse(f"config.json: unknown {kind} block type {t!r}; supported: {sorted(table)}.")
    if not (len(widths) == len(down) == len(up)):
        refuse(
            f"config.json: block_out_channels ({len(widths)}), down_block_types "
            f"({len(down)}) and up_block_types ({len(up)}) must have the same length."
        )
    down_attn = [DOWN_BLOCKS[t] for t in down]
    up_attn = [UP_BLOCKS[t] for t in reversed(up)]  # up_block_types run deepest level first
    if down_attn != up_attn:
        refuse(
            f"config.json: attention in down_block_types {down} and up_block_types {up} is at "
            "different levels; the lab's U-Net puts attention at the same levels on both "
            "paths."
        )
    base = widths[0]
    if any(w % base for w in widths):
        refuse(
            f"config.json: block_out_channels {widths} are not all multiples of the first; "
            "the lab's U-Net has widths base_channels * channel_mult."
        )
    time_dim = c.get("time_embedding_dim")
    if time_dim not in (None, 4 * base):
        refuse(
            f"config.json: time_embedding_dim={time_dim} is not supported; the lab's U-Net "
            f"uses 4 * block_out_channels[0] = {4 * base}."
        )
    layers = c.get("layers_per_block", 2)
    if not isinstance(layers, int):
        refuse(f"config.json: layers_per_block={layers!r} must be one int for every level.")
    groups = c.get("norm_num_groups", 32)
    if groups is None or any(w % groups for w in widths):
        refuse(f"config.json: norm_num_groups={groups} must divide every width in {widths}.")
    if c.get("attn_norm_num_groups") not in (None, groups):
        refuse(
            f"config.json: attn_norm_num_groups={c['attn_norm_num_groups']} differs from "
            f"norm_num_groups={groups}; the lab's attention norm uses norm_num_groups."
        )
    padding = c.get("downsample_padding", 1)
    if padding not in (0, 1):
        refuse(f"config.json: downsample_padding={padding} is not supported (0 or 1 only).")
    act = c.get("act_fn", "silu")
    if act not in ACT_FROM_DIFFUSERS:
        refuse(f"config.json: act_fn={act!r} is not supported; choose from {ACT_FROM_DIFFUSERS}.")
    mid_attention = bool(c.get("add_attention", True))
    levels = tuple(i for i, a in enumerate(down_attn) if a)
    head_dim = c.get("attention_head_dim", 8)
    attn_widths = [widths[i] for i in levels] + ([widths[-1]] if mid_attention else [])
    if head_dim is not None:
        bad = [w for w in attn_widths if w % head_dim]
        if bad:
            refuse(
                f"config.json: attention_head_dim={head_dim} does not divide the attention "
                f"blocks' widths {bad}; diffusers would then project to fewer channels, which "
                "the lab's U-Net does not represent."
            )
    n_class = c.get("num_class_embeds")
    if n_class is not None and n_class < 2:
        refuse(f"config.json: num_class_embeds={n_class} must be >= 2 (classes + null label).")
    return dict(
        out_channels=c.get("out_channels", 3),
        base_channels=base,
        channel_mult=tuple(w // base for w in widths),
        num_res_blocks=layers,
        attention_resolutions=(),
        attention_levels=levels,
        attention_heads=1,
        attention_head_dim=int(head_dim or 0),  # None: one head of all channels per block
        dropout=float(c.get("dropout", 0.0)),
        num_groups=groups,
        activation=ACT_FROM_DIFFUSERS[act],
        outer_activation="silu",  # TimestepEmbedding and conv_act are SiLU whatever act_fn
        time_embedding="sinusoidal",
        time_scale=float(num_train_timesteps),
        time_index_offset=1.0,
        time_flip_sin_to_cos=bool(c.get("flip_sin_to_cos", True)),
        time_freq_shift=float(c.get("freq_shift", 0)),
        norm_eps=float(c.get("norm_eps", 1e-5)),
        downsample="conv",
        downsample_padding=padding,
        upsample="nearest",
        mid_attention=mid_attention,
        center_input=bool(c.get("center_input_sample", False)),
        num_classes=(n_class - 1) if n_class else 0,
        cond_dim=0,
        norm="group",  # UNet2DModel always normalises and keeps the skip path
        residual=True,
    )


DEFAULT_DOWN = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
DEFAULT_UP = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")


def _attention_levels(model: UNet, sample_size) -> tuple[int, ...]:
    levels = set(model.attention_levels)
    if model.attention_resolutions:
        if sample_size is None:
            refuse(
                "The U-Net places attention by feature-map size (model.attention_resolutions="
                f"{tuple(model.attention_resolutions)}); pass sample_size (the image size) so "
                "that it becomes diffusers' per-level block types."
            )
        size = sample_size if isinstance(sample_size, int) else sample_size[0]
        for level in range(len(model.channel_mult)):
            if size // 2**level in model.attention_resolutions:
                levels.add(level)
    return tuple(sorted(levels))


def lab_to_unet_config(model: UNet, in_channels: int, sample_size=None) -> dict:
    """The ``UNet2DModel`` config.json for the lab's U-Net (refusing, by field name, what
    ``UNet2DModel`` cannot represent). The time index is handled by ``export_unet2d``."""
    m = model
    checks = [
        (m.time_embedding == "sinusoidal", "model.time_embedding must be 'sinusoidal'"),
        (m.downsample == "conv", "model.downsample must be 'conv'"),
        (m.upsample == "nearest", "model.upsample must be 'nearest'"),
        (m.cond_dim == 0, "model.cond_dim must be 0 (UNet2DModel has no vector condition)"),
        (
            (m.outer_activation or m.activation) == "silu",
            "model.outer_activation (or model.activation when it is '') must be 'silu': "
            "UNet2DModel's time MLP and output head are SiLU",
        ),
        (
            m.activation in ACT_TO_DIFFUSERS,
            f"model.activation must be one of {sorted(ACT_TO_DIFFUSERS)} ('gelu' is the tanh "
            "approximation; diffusers' 'gelu' is the erf form, the lab's 'gelu_exact')",
        ),
        (m.downsample_padding in (0, 1), "model.downsample_padding must be 0 or 1"),
        (m.norm == "group", "model.norm must be 'group' (UNet2DModel always has GroupNorm)"),
        (m.residual is True, "model.residual must be True (UNet2DModel's blocks are residual)"),
    ]
    for ok, msg in checks:
        if not ok:
            refuse(f"Cannot export to UNet2DModel: {msg}.")
    widths = [m.base_channels * k for k in m.channel_mult]
    levels = _attention_levels(m, sample_size)
    if m.attention_head_dim:
        head_dim = m.attention_head_dim
    elif m.attention_heads == 1:
        head_dim = None  # diffusers: one head of all channels in every block
    else:
        attn_widths = {widths[i] for i in levels} | ({widths[-1]} if m.mid_attention else set())
        if len(attn_widths) > 1:
            refuse(
                f"Cannot export to UNet2DModel: model.attention_heads={m.attention_heads} "
                f"over attention widths {sorted(attn_widths)} gives different head sizes; "
                "UNet2DModel has one attention_head_dim (set model.attention_head_dim)."
            )
        head_dim = attn_widths.pop() // m.attention_heads if attn_widths else None
    return {
        "_class_name": "UNet2DModel",
        "sample_size": sample_size,
        "in_channels": in_channels,
        "out_channels": m.out_channels,
        "center_input_sample": m.center_input,
        "time_embedding_type": "positional",
        "freq_shift": m.time_freq_shift,
        "flip_sin_to_cos": m.time_flip_sin_to_cos,
        "down_block_types": [
            "AttnDownBlock2D" if i in levels else "DownBlock2D" for i in range(len(widths))
        ],
        "up_block_types": [
            "AttnUpBlock2D" if i in levels else "UpBlock2D" for i in reversed(range(len(widths)))
        ],
        "block_out_channels": widths,
        "layers_per_block": m.num_res_blocks,
        "mid_block_scale_factor": 1,
        "downsample_padding": m.downsample_padding,
        "downsample_type": "conv",
        "upsample_type": "conv",
        "dropout": m.dropout,
        "act_fn": ACT_TO_DIFFUSERS[m.activation],
        "attention_head_dim": head_dim,
        "norm_num_groups": m.num_groups,
        "attn_norm_num_groups": None,
        "norm_eps": m.norm_eps,
        "resnet_time_scale_shift": "default",
        "add_attention": m.mid_attention,
        "class_embed_type": None,
        "num_class_embeds": (m.num_classes + 1) if m.num_classes else None,
    }


def scheduler_config(
    schedule: str,
    num_timesteps: int,
    prediction: str = "eps",
    clip_x0: float | None = 1.0,
    variance: str = "beta_tilde",
) -> dict:
    """``DDPMScheduler`` config.json for the lab's schedule (same alphas_cumprod)."""
    T = int(num_timesteps)
    if schedule == "linear":
        # The lab scales DDPM's endpoints by 1000 / T (diffusion/schedules.py).
        betas = dict(
            beta_schedule="linear",
            beta_start=LINEAR_BETA_START * 1000.0 / T,
            beta_end=LINEAR_BETA_END * 1000.0 / T,
        )
    elif schedule == "cosine":
        betas = dict(beta_schedule="squaredcos_cap_v2")  # Nichol & Dhariwal eq. 17, beta <= 0.999
    else:
        refuse(
            f"diffusion.schedule={schedule!r} has no DDPMScheduler equivalent (diffusers' "
            "'sigmoid' is a sigmoid in beta, not in alpha_bar); export 'linear' or 'cosine'."
        )
    if prediction not in PREDICTION_TO_DIFFUSERS:
        refuse(
            f"diffusion.prediction={prediction!r}: choose from {sorted(PREDICTION_TO_DIFFUSERS)}."
        )
    if variance not in VARIANCE_TO_DIFFUSERS:
        refuse(f"sample.variance={variance!r}: choose from {sorted(VARIANCE_TO_DIFFUSERS)}.")
    return {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": T,
        **betas,
        "variance_type": VARIANCE_TO_DIFFUSERS[variance],
        "clip_sample": clip_x0 is not None,
        "clip_sample_range": float(clip_x0 if clip_x0 is not None else 1.0),
        "prediction_type": PREDICTION_TO_DIFFUSERS[prediction],
        "steps_offset": 0,
    }


def scheduler_config_to_lab(config: dict) -> dict:
    """The lab's diffusion settings for a DDPM/DDIM scheduler config: ``schedule``,
    ``num_timesteps``, ``prediction``, ``clip_x0`` and ``variance``; refuses the rest."""
    c = config
    T = int(c.get("num_train_timesteps", 1000))
    for field, default in (
        ("trained_betas", None),
        ("thresholding", False),
        ("rescale_betas_zero_snr", False),
    ):
        if c.get(field, default) not in (default,):
            refuse(f"scheduler_config.json: {field}={c[field]!r} has no lab equivalent.")
    kind = c.get("beta_schedule", "linear")
    if kind == "linear":
        start, end = c.get("beta_start", 1e-4), c.get("beta_end", 0.02)
        want = (LINEAR_BETA_START * 1000 / T, LINEAR_BETA_END * 1000 / T)
        if not np.allclose([start, end], want, rtol=1e-6, atol=0):
            refuse(
                f"scheduler_config.json: linear betas {start}..{end} at T={T} are not the lab's "
                f"linear schedule ({want[0]:g}..{want[1]:g}, DDPM's scaled by 1000 / T)."
            )
        schedule = "linear"
    elif kind == "squaredcos_cap_v2":
        schedule = "cosine"
    else:
        refuse(
            f"scheduler_config.json: beta_schedule={kind!r} has no lab equivalent "
            "(supported: 'linear', 'squaredcos_cap_v2')."
        )
    pred = c.get("prediction_type", "epsilon")
    if pred not in PREDICTION_FROM_DIFFUSERS:
        refuse(f"scheduler_config.json: prediction_type={pred!r} is not supported.")
    var = {"fixed_small": "beta_tilde", "fixed_large": "beta"}.get(
        c.get("variance_type", "fixed_small")
    )
    return dict(
        schedule=schedule,
        num_timesteps=T,
        prediction=PREDICTION_FROM_DIFFUSERS[pred],
        clip_x0=float(c.get("clip_sample_range", 1.0)) if c.get("clip_sample", True) else None,
        variance=var,  # None: a learned or other variance the lab's samplers do not take
    )
