"""CLIP text (and image) encoders as the text-conditioned tasks use them: the pooled
embeddings of text2img and the unCLIP prior, and the token sequence for cross-attention
(Stable Diffusion's conditioning) of text2img and latent diffusion
(``text.conditioning = "tokens"``).

- ``ClipDir``: a CLIP directory loaded once (model, parameters, tokenizer, weight digest).
- ``ClipEmbedder``: L2-normalised image and text embeddings (``text.conditioning =
  "pooled"``, the prior).
- ``TokenEncoder``: a CLIP directory (Hugging Face layout) -> for each prompt, the text
  encoder's last hidden states [L, hidden_size] (after the final LayerNorm, as Stable
  Diffusion's ``encoder_hidden_states``) and its attention mask [L] (True for real tokens,
  padding False), L = the CLIP's max_position_embeddings.
- ``TokenTable``: the token sequences of a fixed list of distinct prompts, computed once when
  a task loads its resources. The condition of a training image, of a sample and of the null
  condition is an int index into it; the U-Net's ``context`` is gathered inside the jitted
  step. Why a table and not a per-image cache as the pooled embeddings have
  (``DIR/clip_embeddings_*.npz``): the captions are class templates, a few dozen distinct
  strings, while a per-image cache of sequences would hold N x L x D floats (60,000 x 77 x
  512 = 9 GB for a CLIP of Stable Diffusion's width) for the same few dozen distinct rows.
- ``TokenConditioning``: the four conditioning hooks of ``tasks/denoising.py`` for such
  indices (a mix-in placed before the task's base class): ``condition_kwargs`` (index ->
  context, context_mask; at training time dropped to the empty prompt "" at rate
  ``train.p_uncond``), ``uncond_kwargs`` (the empty prompt's sequence: classifier-free
  guidance's null condition, as Stable Diffusion's), and ``context_inputs`` for
  ``init_params``.

Not here: the cross-attention blocks (``transformer.py``).
"""

from __future__ import annotations

import copy
import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from diffax_lab.config_lib import check_number
from diffax_lab.errors import ConfigError
from diffax_lab.models.clip import clip_preprocess
from diffax_lab.models.clip_io import load_clip, load_tokenizer, tokenize

CONDITIONINGS = ("pooled", "tokens")
NULL_PROMPT = ""


class ClipDir:
    """A CLIP directory (Hugging Face layout) loaded once: the Flax CLIP, its parameters
    (computing in ``dtype``), config and tokenizer, and ``digest``, a hash of the weights
    that names whatever is cached from them. ``field`` names the config field in errors."""

    def __init__(self, clip_dir: str, field: str = "config.text.clip_dir", dtype=jnp.float32):
        if not clip_dir:
            raise ConfigError(
                f"{field} is empty: give a CLIP directory (Hugging Face layout), "
                "e.g. workdirs/clip/hf_clip from configs/clip.py, or a hub id when online."
            )
        try:
            self.model, self.params, self.config = load_clip(clip_dir, dtype)
            self.tokenizer = load_tokenizer(clip_dir)
        except FileNotFoundError as e:
            raise ConfigError(f"{field}={clip_dir!r}: {e}") from e
        self.clip_dir = clip_dir
        self.dtype = jnp.dtype(dtype)
        h = hashlib.sha256()
        for x in jax.tree.leaves(self.params):
            h.update(np.asarray(x).tobytes())
        self.digest = h.hexdigest()[:12]

    def tokenize(self, prompts) -> tuple[jax.Array, np.ndarray]:
        """(int ids [N, L], int mask [N, L]) padded to the text encoder's length L."""
        ids, mask = tokenize(self.tokenizer, prompts, self.config.text.max_position_embeddings)
        return jnp.asarray(ids), mask


class ClipEmbedder(ClipDir):
    """L2-normalised CLIP image and text embeddings (``dim`` = the projection size): the
    pooled conditioning of text2img and the prior's space. Also a feature extractor
    (``name``, ``__call__`` on uint8 images) for the cached-features helpers."""

    def __init__(self, clip_dir: str, field: str = "config.text.clip_dir", dtype=jnp.float32):
        super().__init__(clip_dir, field, dtype)
        self.dim = self.config.projection_dim
        self.name = f"clip-{self.digest}-{self.dtype.name}"
        size = self.config.vision.image_size

        def norm(e):
            e = e.astype(jnp.float32)
            return e / jnp.linalg.norm(e, axis=-1, keepdims=True)

        self._images = jax.jit(
            lambda x_u8: norm(
                self.model.apply(
                    {"params": self.params}, clip_preprocess(x_u8, size), method="encode_image"
                )
            )
        )
        self._texts = jax.jit(
            lambda ids, mask: norm(
                self.model.apply({"params": self.params}, ids, mask, method="encode_text")
            )
        )

    def embed_images(self, images_u8: np.ndarray, batch_size: int = 500) -> np.ndarray:
        return np.concatenate(
            [
                np.asarray(self._images(images_u8[i : i + batch_size]))
                for i in range(0, len(images_u8), batch_size)
            ]
        )

    __call__ = embed_images

    def embed_texts(self, prompts, batch_size: int = 500) -> np.ndarray:
        prompts = list(prompts)
        out = []
        for i in range(0, len(prompts), batch_size):
            ids, mask = self.tokenize(prompts[i : i + batch_size])
            out.append(np.asarray(self._texts(ids, jnp.asarray(mask))))
        return np.concatenate(out)


class TokenEncoder(ClipDir):
    """A CLIP directory's text encoder as prompts -> (last hidden states, mask)."""

    def __init__(self, clip_dir: str, field: str = "config.text.clip_dir", dtype=jnp.float32):
        super().__init__(clip_dir, field, dtype)
        self.dim = self.config.text.hidden_size
        self.length = self.config.text.max_position_embeddings

        @jax.jit
        def hidden(ids, mask):
            _, state = self.model.apply(
                {"params": self.params},
                ids,
                mask,
                method="encode_text",
                mutable=["intermediates"],
            )
            (h,) = state["intermediates"]["text_model"]["last_hidden_state"]
            return h.astype(jnp.float32)

        self._hidden = hidden

    def encode(self, prompts) -> tuple[np.ndarray, np.ndarray]:
        """(float32 [N, L, hidden_size], bool [N, L]) of a list of prompts."""
        ids, mask = self.tokenize(prompts)
        return np.asarray(self._hidden(ids, jnp.asarray(mask))), mask.astype(bool)


class TokenTable:
    """Token sequences of distinct prompts (first occurrence order); the null prompt last."""

    def __init__(self, encoder: TokenEncoder, prompts):
        unique = list(dict.fromkeys([*prompts, NULL_PROMPT]))
        self.prompts = unique
        self.position = {p: i for i, p in enumerate(unique)}
        self.hidden, self.mask = encoder.encode(unique)
        self.null_index = self.position[NULL_PROMPT]

    def __len__(self) -> int:
        return len(self.prompts)

    def index(self, prompts) -> np.ndarray:
        """int32 indices of prompts that the table holds (a clear error for one it lacks)."""
        missing = [p for p in prompts if p not in self.position]
        if missing:
            raise ValueError(f"Prompts not in the token table: {missing[:3]}.")
        return np.asarray([self.position[p] for p in prompts], np.int32)


def check_text_conditioning(config) -> str:
    """Checks text.conditioning and the model fields it needs; returns it."""
    kind = config.text.get("conditioning", "pooled")
    if kind not in CONDITIONINGS:
        raise ConfigError(
            f"config.text.conditioning={kind!r} must be one of {CONDITIONINGS}: 'pooled' "
            "(a CLIP embedding vector, model.cond_dim) or 'tokens' (cross-attention to the "
            "text encoder's token sequence, model.cross_attention_dim)."
        )
    if kind == "tokens":
        check_number(config, "model.cross_attention_dim", low=1, integer=True)
        check_number(config, "model.transformer_depth", low=1, integer=True)
        if config.model.cond_dim:
            raise ConfigError(
                "config.text.conditioning='tokens' conditions through cross-attention only: "
                "set config.model.cond_dim=0."
            )
    elif config.model.get("cross_attention_dim", 0):
        raise ConfigError(
            "config.model.cross_attention_dim > 0 needs config.text.conditioning='tokens'."
        )
    return kind


def check_class_prompts(config) -> None:
    """text.class_names (non-empty strings in label order) and text.template (one '{}'):
    the class prompts every text-conditioned task evaluates and builds captions from."""
    names = tuple(config.text.get("class_names", ()))
    if not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise ConfigError(
            "config.text.class_names must list the dataset's class names (non-empty strings, "
            "in label order): captions and the evaluation's class prompts are built from them."
        )
    template = config.text.get("template", "")
    if not isinstance(template, str) or template.count("{}") != 1:
        raise ConfigError(
            f"config.text.template={template!r} must contain '{{}}' once, where the class "
            "name goes (e.g. 'a photo of a {}')."
        )


def build_token_table(config, encoder: TokenEncoder, templates) -> TokenTable:
    """The distinct prompts a token-conditioned task can meet, in this order: the class
    prompts text.template (index = class label), each of ``templates`` for each class
    (the training captions),
    sample.prompts, and the empty prompt (the null condition)."""
    t = config.text
    if encoder.dim != config.model.cross_attention_dim:
        raise ConfigError(
            f"config.model.cross_attention_dim={config.model.cross_attention_dim} but the CLIP "
            f"text encoder in config.text.clip_dir={t.clip_dir!r} is {encoder.dim} wide; set "
            "them equal."
        )
    classes = [t.template.format(n) for n in t.class_names]
    captions = [tpl.format(n) for tpl in templates for n in t.class_names]
    return TokenTable(encoder, [*classes, *captions, *config.sample.get("prompts", ())])


def conditional_view(config):
    """``config`` as the generic checks of tasks/denoising.py should see it: they count a
    model as conditional by model.num_classes or model.cond_dim only, so a copy with cond_dim
    = cross_attention_dim stands in for a token-conditioned model (the hook they lack: count
    model.cross_attention_dim too; then this goes)."""
    if not config.model.get("cross_attention_dim", 0) or config.model.cond_dim:
        return config
    view = copy.deepcopy(config)
    view.model.cond_dim = config.model.cross_attention_dim
    return view


class TokenConditioning:
    """Conditioning hooks for int indices into ``self.token_table`` (set in load_resources).

    The task must have ``self.config.train.p_uncond``; CFG runs when it is > 0."""

    token_table: TokenTable | None = None

    def _context(self, index):
        table = self.token_table
        if table is None:
            raise RuntimeError("The token table is built in load_resources; call it first.")
        hidden, mask = jnp.asarray(table.hidden), jnp.asarray(table.mask)
        index = jnp.asarray(index, jnp.int32)
        return {"context": hidden[index], "context_mask": mask[index]}

    def condition_kwargs(self, cond, train: bool = False, key=None) -> dict:
        p = self.config.train.p_uncond
        if train and p > 0:  # classifier-free guidance: drop to the empty prompt
            drop = jax.random.bernoulli(key, p, cond.shape)
            cond = jnp.where(drop, self.token_table.null_index, cond)
        return self._context(cond)

    def uncond_kwargs(self, cond) -> dict | None:
        if self.config.train.p_uncond == 0:
            return None
        return self._context(jnp.full(cond.shape, self.token_table.null_index, jnp.int32))

    def context_inputs(self) -> dict:
        """Dummy (context, context_mask) of one example for ``model.init``: one token of
        ``model.cross_attention_dim`` (parameter shapes do not depend on the length, so no
        CLIP needs to be loaded to build or restore the state)."""
        dim = self.config.model.cross_attention_dim
        return {"context": jnp.zeros((1, 1, dim)), "context_mask": jnp.ones((1, 1), bool)}
