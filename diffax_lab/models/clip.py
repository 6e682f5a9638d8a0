"""CLIP in Flax Linen: a port of Hugging Face's ``CLIPModel`` whose parameter tree mirrors
its state-dict names one to one, so Hugging Face checkpoints load by a mechanical rename.

``CLIP(config).apply(params, input_ids, pixel_values, attention_mask=None)`` returns
(logits_per_image, logits_per_text, text_embeds, image_embeds); ``method="encode_text"`` /
``"encode_image"`` give the projected (unnormalised) embeddings alone. Images are NHWC,
already preprocessed (``clip_preprocess`` below). Text: causal
self-attention, the padding mask, pooling at the end-of-text token (the first
``eos_token_id``; the largest id for configs whose eos id is the legacy 2, as in
transformers). Vision: patch convolution without bias, class token, pre-LN ("pre_layrnorm",
Hugging Face's spelling), post-LN on the class token. Activation ``quick_gelu`` (OpenAI's)
or ``gelu``.

Naming: the Flax path of every parameter is the Hugging Face key with its last part
renamed: ``weight`` -> ``kernel`` (Dense, transposed; Conv, OIHW -> HWIO), ``scale``
(LayerNorm) or ``embedding`` (Embed); ``bias`` stays. ``diffax_lab.models.clip_io``
converts both ways.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# CLIP's image preprocessing, as CLIPImageProcessor: resize the shorter side to the model's
# size (bicubic), centre crop, scale to [0, 1], normalise with CLIP's mean and std; grey
# images are repeated to three channels. (Its bicubic resize is JAX's, not PIL's: pixel
# values differ slightly from the PyTorch pipeline, by design of no Pillow inside jit.)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(images, size: int):
    """uint8 [0, 255] or float [0, 1] images [B, H, W, C] (C = 1 or 3) -> [B, size, size, 3]."""
    x = images.astype(jnp.float32)
    if jnp.issubdtype(images.dtype, jnp.integer):
        x = x / 255.0
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    b, h, w, c = x.shape
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = jax.image.resize(x, (b, nh, nw, c), method="bicubic")
    top, left = (nh - size) // 2, (nw - size) // 2
    x = jnp.clip(x[:, top : top + size, left : left + size], 0.0, 1.0)
    return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


@functools.partial(jax.jit, static_argnames=("clip",))
def clip_embeddings(clip, params, images, input_ids, attention_mask):
    """(image [B, D], text [B, D]) CLIP embeddings (projected, not normalised) of images
    [B, H, W, C] (uint8 or [0, 1]) and their captions (token ids [B, L] and mask from the
    CLIP tokenizer); ``metrics.clip_score`` scores them."""
    pixels = clip_preprocess(images, clip.config.vision.image_size)
    img = clip.apply({"params": params}, pixels, method="encode_image")
    txt = clip.apply({"params": params}, input_ids, attention_mask, method="encode_text")
    return img, txt


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    text: TextConfig = TextConfig()
    vision: VisionConfig = VisionConfig()
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592

    @classmethod
    def from_hf_dict(cls, d: dict) -> CLIPConfig:
        """From a Hugging Face CLIP config.json (unknown keys are ignored)."""

        def pick(kind, sub):
            names = {f.name for f in dataclasses.fields(kind)}
            return kind(**{k: v for k, v in (sub or {}).items() if k in names})

        return cls(
            text=pick(TextConfig, d.get("text_config")),
            vision=pick(VisionConfig, d.get("vision_config")),
            projection_dim=d.get("projection_dim", 512),
            logit_scale_init_value=d.get("logit_scale_init_value", 2.6592),
        )

    def to_hf_dict(self) -> dict:
        return {
            "architectures": ["CLIPModel"],
            "model_type": "clip",
            "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init_value,
            "text_config": dataclasses.asdict(self.text),
            "vision_config": dataclasses.asdict(self.vision),
        }


def _act(name: str):
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name == "gelu_new":
        return lambda x: jax.nn.gelu(x, approximate=True)
    raise ValueError(f"CLIP hidden_act {name!r} is not supported (quick_gelu, gelu, gelu_new).")


class Attention(nn.Module):
    hidden_size: int
    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        b, n, d = x.shape
        hd = d // self.num_heads

        def proj(name):
            return nn.Dense(d, dtype=self.dtype, name=name)(x).reshape(b, n, self.num_heads, hd)

        q, k, v = proj("q_proj"), proj("k_proj"), proj("v_proj")
        logits = jnp.einsum("bqhd,bkhd->bhqk", q * hd**-0.5, k).astype(jnp.float32)
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        w = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, n, d)
        return nn.Dense(d, dtype=self.dtype, name="out_proj")(out)


class MLP(nn.Module):
    hidden_size: int
    intermediate_size: int
    act: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.intermediate_size, dtype=self.dtype, name="fc1")(x)
        return nn.Dense(self.hidden_size, dtype=self.dtype, name="fc2")(_act(self.act)(x))


class EncoderLayer(nn.Module):
    hidden_size: int
    intermediate_size: int
    num_heads: int
    act: str
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        h = nn.LayerNorm(self.eps, dtype=self.dtype, name="layer_norm1")(x)
        x = x + Attention(self.hidden_size, self.num_heads, self.dtype, name="self_attn")(h, mask)
        h = nn.LayerNorm(self.eps, dtype=self.dtype, name="layer_norm2")(x)
        return x + MLP(self.hidden_size, self.intermediate_size, self.act, self.dtype, name="mlp")(
            h
        )


class Encoder(nn.Module):
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_layers: int
    act: str
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        for i in range(self.num_layers):
            x = EncoderLayer(
                self.hidden_size,
                self.intermediate_size,
                self.num_heads,
                self.act,
                self.eps,
                self.dtype,
                name=f"layers_{i}",
            )(x, mask)
        return x


class TextEmbeddings(nn.Module):
    c: TextConfig

    @nn.compact
    def __call__(self, input_ids):
        tok = nn.Embed(self.c.vocab_size, self.c.hidden_size, name="token_embedding")(input_ids)
        pos = nn.Embed(
            self.c.max_position_embeddings, self.c.hidden_size, name="position_embedding"
        )
        return tok + pos(jnp.arange(input_ids.shape[1]))[None]


class TextTransformer(nn.Module):
    c: TextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        c = self.c
        b, n = input_ids.shape
        if n > c.max_position_embeddings:
            raise ValueError(
                f"Text of {n} tokens exceeds CLIP's max_position_embeddings="
                f"{c.max_position_embeddings}; truncate when tokenizing."
            )
        x = TextEmbeddings(c, name="embeddings")(input_ids).astype(self.dtype)
        mask = jnp.tril(jnp.ones((n, n), bool))[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask.astype(bool)[:, None, None, :]
        x = Encoder(
            c.hidden_size,
            c.intermediate_size,
            c.num_attention_heads,
            c.num_hidden_layers,
            c.hidden_act,
            c.layer_norm_eps,
            self.dtype,
            name="encoder",
        )(x, mask)
        x = nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="final_layer_norm")(x)
        # Hugging Face's last_hidden_state (the token sequence cross-attention attends to):
        # apply(..., mutable=["intermediates"]) returns it.
        self.sow("intermediates", "last_hidden_state", x)
        if c.eos_token_id == 2:  # legacy configs: the end token has the largest id
            eos = jnp.argmax(input_ids, axis=-1)
        else:
            eos = jnp.argmax((input_ids == c.eos_token_id).astype(jnp.int32), axis=-1)
        return x[jnp.arange(b), eos]


class VisionEmbeddings(nn.Module):
    c: VisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        c = self.c
        b, h, w, _ = pixel_values.shape
        if h != c.image_size or w != c.image_size:
            raise ValueError(
                f"CLIP takes {c.image_size}x{c.image_size} images, got {h}x{w}; "
                "preprocess with diffax_lab.models.clip.clip_preprocess."
            )
        cls = self.param("class_embedding", nn.initializers.normal(0.02), (c.hidden_size,))
        patches = nn.Conv(
            c.hidden_size,
            (c.patch_size, c.patch_size),
            strides=(c.patch_size, c.patch_size),
            padding="VALID",
            use_bias=False,
            dtype=self.dtype,
            name="patch_embedding",
        )(pixel_values.astype(self.dtype))
        patches = patches.reshape(b, -1, c.hidden_size)
        x = jnp.concatenate(
            [jnp.broadcast_to(cls.astype(self.dtype), (b, 1, c.hidden_size)), patches], 1
        )
        num_pos = (c.image_size // c.patch_size) ** 2 + 1
        pos = nn.Embed(num_pos, c.hidden_size, name="position_embedding")(jnp.arange(num_pos))
        return x + pos[None].astype(self.dtype)


class VisionTransformer(nn.Module):
    c: VisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        c = self.c
        x = VisionEmbeddings(c, self.dtype, name="embeddings")(pixel_values)
        x = nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="pre_layrnorm")(x)
        x = Encoder(
            c.hidden_size,
            c.intermediate_size,
            c.num_attention_heads,
            c.num_hidden_layers,
            c.hidden_act,
            c.layer_norm_eps,
            self.dtype,
            name="encoder",
        )(x)
        return nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="post_layernorm")(x[:, 0])


class CLIP(nn.Module):
    config: CLIPConfig = CLIPConfig()
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.text_model = TextTransformer(c.text, self.dtype)
        self.vision_model = VisionTransformer(c.vision, self.dtype)
        self.text_projection = nn.Dense(c.projection_dim, use_bias=False, dtype=self.dtype)
        self.visual_projection = nn.Dense(c.projection_dim, use_bias=False, dtype=self.dtype)
        self.logit_scale = self.param(
            "logit_scale", nn.initializers.constant(c.logit_scale_init_value), ()
        )

    def encode_text(self, input_ids, attention_mask=None):
        """[B, L] int token ids (padded; mask 1 for real tokens) -> [B, projection_dim]."""
        pooled = self.text_model(input_ids, attention_mask)
        return self.text_projection(pooled).astype(jnp.float32)

    def encode_image(self, pixel_values):
        """[B, S, S, 3] preprocessed images -> [B, projection_dim]."""
        return self.visual_projection(self.vision_model(pixel_values)).astype(jnp.float32)

    def __call__(self, input_ids, pixel_values, attention_mask=None):
        text = self.encode_text(input_ids, attention_mask)
        image = self.encode_image(pixel_values)
        tn = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
        im = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
        logits_per_text = jnp.exp(self.logit_scale) * tn @ im.T
        return logits_per_text.T, logits_per_text, text, image
