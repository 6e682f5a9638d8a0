"""The lab's own CLIP: contrastive training, zero-shot eval, and the exported directory
loading like a pretrained Hugging Face CLIP."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax_lab.models.clip_io import load_clip, load_tokenizer
from diffax_lab.modes import evaluate
from diffax_lab.sharding import make_mesh
from diffax_lab.tasks import registry
from diffax_lab.tasks.clip import write_word_tokenizer
from tests.helpers import load_config


def test_word_tokenizer_spells_each_caption_word_as_one_token(tmp_path):
    write_word_tokenizer(str(tmp_path), ["a photo of a ankle boot", "a photo of a bag"])
    tok = load_tokenizer(str(tmp_path))
    ids = tok(["a photo of a bag"])["input_ids"][0]
    assert len(ids) == 2 + 5  # start, five words, end
    assert tok.convert_ids_to_tokens(ids[1:-1]) == [
        "a</w>",
        "photo</w>",
        "of</w>",
        "a</w>",
        "bag</w>",
    ]


@pytest.mark.slow
def test_trains_evaluates_and_exports_a_loadable_clip(tiny_clip):
    config, workdir = tiny_clip  # configs/clip.py:tiny trained on 64 fake images (conftest)
    report = evaluate.run(config, workdir)
    assert report["num_examples"] == 32 and 0.0 <= report["zero_shot_accuracy"] <= 1.0
    clip, params, cfg = load_clip(f"{workdir}/hf_clip")
    tok = load_tokenizer(f"{workdir}/hf_clip")
    t = tok(["a photo of a sneaker"], padding="max_length", max_length=16, return_tensors="np")
    emb = clip.apply(
        {"params": params},
        jnp.asarray(t["input_ids"]),
        jnp.asarray(t["attention_mask"]),
        method="encode_text",
    )
    assert emb.shape == (1, cfg.projection_dim) and np.all(np.isfinite(np.asarray(emb)))


def test_clip_computes_in_model_dtype():
    """model.dtype reaches the CLIP (it was ignored): bfloat16 compute, float32 parameters."""
    config = load_config("clip.py", "tiny")
    config.model.dtype = "bfloat16"
    task = registry.build(config, make_mesh(1))
    assert task.model.dtype == jnp.bfloat16
    params = task.abstract_state["params"]
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}
