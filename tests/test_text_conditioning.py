"""Text conditioning by cross-attention to CLIP's token sequence (text.conditioning =
"tokens"): the token table, classifier-free guidance with the empty prompt, a tiny
text2img-tokens run that trains and samples, and the latent-diffusion config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax_lab.data.captions import FASHION_MNIST_CLASSES, TEMPLATES
from diffax_lab.errors import ConfigError
from diffax_lab.models import build_clip, clip_config
from diffax_lab.models.clip_io import save_clip
from diffax_lab.models.text_context import TokenEncoder
from diffax_lab.modes import sample, train
from diffax_lab.sharding import make_mesh
from diffax_lab.tasks import registry
from diffax_lab.tasks.clip import write_word_tokenizer
from tests.helpers import load_config


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A randomly initialised tiny CLIP (configs/clip.py:tiny) in Hugging Face's layout."""
    config = load_config("clip.py", "tiny")
    k = config.clip
    ids = jnp.zeros((1, k.context_length), jnp.int32)
    pix = jnp.zeros((1, config.data.image_size, config.data.image_size, 3))
    params = jax.jit(build_clip(config).init)(jax.random.key(0), ids, pix)["params"]
    path = str(tmp_path_factory.mktemp("clip"))
    save_clip(path, clip_config(config), params)
    texts = [t.format(n) for t in TEMPLATES for n in FASHION_MNIST_CLASSES]
    write_word_tokenizer(path, texts)
    return path


def tokens_config(data, clip_dir, **overrides):
    config = load_config("text2img.py", "tiny")
    config.data.dir, config.data.num_examples = str(data), 0
    config.text.clip_dir = clip_dir
    config.text.conditioning = "tokens"
    config.model.cond_dim = 0
    config.model.cross_attention_dim = 16  # configs/clip.py:tiny's text width
    config.train.num_steps = 2
    config.train.checkpoint_every = 2
    for k, v in overrides.items():
        section, field = k.split(".")
        config[section][field] = v
    return config


def test_token_encoder_gives_masked_last_hidden_states(clip_dir):
    enc = TokenEncoder(clip_dir)
    hidden, mask = enc.encode(["a photo of a bag", "a photo of a ankle boot", ""])
    assert hidden.shape == (3, enc.length, 16) and mask.dtype == bool
    # start + 5 words + end; one more word; the empty prompt is start + end only.
    assert mask.sum(1).tolist() == [7, 8, 2]
    assert not np.allclose(hidden[0], hidden[1])


def test_config_checks(tiny_data, clip_dir):
    task_cls = registry.get("text2img")
    bad = tokens_config(tiny_data, clip_dir, **{"model.cond_dim": 16})
    with pytest.raises(ConfigError, match="cond_dim=0"):
        task_cls.check_config(bad)
    bad = tokens_config(tiny_data, clip_dir, **{"model.cross_attention_dim": 0})
    with pytest.raises(ConfigError, match="cross_attention_dim"):
        task_cls.check_config(bad)
    bad = tokens_config(tiny_data, clip_dir)
    bad.text.conditioning = "words"
    with pytest.raises(ConfigError, match="text.conditioning"):
        task_cls.check_config(bad)
    ldm = load_config("ldm_text2img.py", "tiny")
    registry.get("latent_diffusion").check_config(ldm)  # the shipped config is accepted
    ldm.text.conditioning, ldm.model.cross_attention_dim = "pooled", 0
    with pytest.raises(ConfigError, match="pooled"):
        registry.get("latent_diffusion").check_config(ldm)


@pytest.mark.slow
def test_text2img_tokens_trains_samples_and_cfg_zero_is_conditional(tiny_data, clip_dir, tmp_path):
    config = tokens_config(tiny_data, clip_dir)
    workdir = str(tmp_path / "t2i_tokens")
    state = train.run(config, workdir)
    assert int(state["step"]) == 2
    params = state["ema_params"]
    assert "attn2" in params["mid_attn"]["transformer_blocks_0"]

    task = registry.build(config, make_mesh(1))
    task.load_resources(workdir, "train")
    table = task.token_table
    assert table.prompts[table.null_index] == ""
    # Training conditions: each image's caption index; class prompts are rows 0..9.
    _, caption_ids = task.train_data(workdir)
    assert caption_ids.shape == (64,) and caption_ids.max() < len(table)
    assert table.prompts[3] == "a photo of a dress"

    # CFG: w = 0 is the conditional network; the null condition is the empty prompt's tokens.
    cond = jnp.asarray(task.prompt_conditions(["a photo of a bag", "a photo of a sneaker"]))
    null = task.uncond_kwargs(cond)
    np.testing.assert_array_equal(
        np.asarray(null["context_mask"]), table.mask[[table.null_index] * 2]
    )
    x = jax.random.normal(jax.random.key(1), (2, 28, 28, 1))
    t = jnp.array([0.2, 0.9])
    # Perturb the zero-initialised heads so that the condition reaches the output.
    params = jax.tree.map(lambda p: p + 0.02, params)
    cond_out = task.model_fn(params, cond)(x, t)
    w0 = task.guided_model_fn(params, cond, 0.0)(x, t)
    np.testing.assert_allclose(np.asarray(w0), np.asarray(cond_out), atol=1e-5)
    w2 = task.guided_model_fn(params, cond, 2.0)(x, t)
    assert float(jnp.max(jnp.abs(w2 - cond_out))) > 1e-4

    out = sample.run(config, workdir)  # one row per prompt
    assert out["samples"].shape[1:] == (28, 28, 1) and out["prompt_grid"].endswith(".png")
