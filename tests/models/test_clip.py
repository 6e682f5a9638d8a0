"""The lab's Flax CLIP against Hugging Face's PyTorch CLIPModel (installed for tests only),
its loading from a Hugging Face layout, and the CLIP score."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import CLIPConfig as HFConfig
from transformers import CLIPModel

from diffax_lab.metrics.clip_score import per_image_clip_scores
from diffax_lab.models.clip import clip_embeddings, clip_preprocess
from diffax_lab.models.clip_io import (
    CLIPLoadError,
    flax_params_from_hf,
    hf_state_dict_from_flax,
    load_clip,
    load_tokenizer,
    save_clip,
)

TEXT = dict(
    vocab_size=99,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=16,
    eos_token_id=98,
    bos_token_id=97,
    pad_token_id=1,
)
VISION = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=30,
    patch_size=6,
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny random CLIP built and saved (safetensors) by transformers itself."""
    torch.manual_seed(0)
    model = CLIPModel(HFConfig(text_config=TEXT, vision_config=VISION, projection_dim=24)).eval()
    path = str(tmp_path_factory.mktemp("hf_clip"))
    model.save_pretrained(path, safe_serialization=True)
    return model, path


def inputs():
    rng = np.random.default_rng(0)
    ids = rng.integers(2, 97, (3, 10))
    ids[:, 0] = 97
    ids[0, 6], ids[0, 7:] = 98, 1  # padded after the end token
    ids[1, 9] = 98
    ids[2, 3], ids[2, 4:] = 98, 1
    mask = (np.arange(10)[None] <= np.argmax(ids == 98, axis=1)[:, None]).astype(np.int64)
    pixels = rng.standard_normal((2, 3, 30, 30)).astype(np.float32)
    return ids, mask, pixels


def test_embeddings_and_logits_match_transformers(reference):
    model, path = reference
    clip, params, _ = load_clip(path)
    ids, mask, pixels = inputs()
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            pixel_values=torch.tensor(pixels),
        )
        text_features = model.get_text_features(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)
        )
        image_features = model.get_image_features(pixel_values=torch.tensor(pixels))
    text_features = getattr(text_features, "pooler_output", text_features)
    image_features = getattr(image_features, "pooler_output", image_features)
    per_image, per_text, text, image = clip.apply(
        {"params": params},
        jnp.asarray(ids),
        jnp.asarray(pixels.transpose(0, 2, 3, 1)),
        jnp.asarray(mask),
    )
    np.testing.assert_allclose(text, text_features.numpy(), atol=1e-4)
    np.testing.assert_allclose(image, image_features.numpy(), atol=1e-4)
    np.testing.assert_allclose(per_text, out.logits_per_text.numpy(), atol=1e-4)
    np.testing.assert_allclose(per_image, out.logits_per_image.numpy(), atol=1e-4)


def test_save_and_load_round_trip_in_the_hugging_face_layout(reference, tmp_path):
    model, path = reference
    clip, params, config = load_clip(path)
    state = hf_state_dict_from_flax(params)
    ref = {k: v.numpy() for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    assert set(state) == set(ref)  # the same names, one to one
    for k in ref:
        assert state[k].shape == ref[k].shape, k
        np.testing.assert_array_equal(state[k], ref[k])
    save_clip(str(tmp_path), config, params)
    assert (
        flax_params_from_hf(load_file(str(tmp_path / "model.safetensors"))).keys() == params.keys()
    )
    _, params2, config2 = load_clip(str(tmp_path))
    assert config2 == config
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_incomplete_or_pickled_directories_are_refused(reference, tmp_path):
    _, path = reference
    os.makedirs(tmp_path / "no_weights")
    with open(tmp_path / "no_weights" / "config.json", "w") as f:
        json.dump({}, f)
    with pytest.raises(CLIPLoadError, match=r"missing model.safetensors or flax_model.msgpack"):
        load_clip(str(tmp_path / "no_weights"))
    (tmp_path / "no_weights" / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(CLIPLoadError, match=r"only pytorch_model.bin, a pickle"):
        load_clip(str(tmp_path / "no_weights"))
    with pytest.raises(CLIPLoadError, match=r"has no tokenizer"):
        load_tokenizer(path)


def test_tokenizer_loads_from_the_same_directory(tmp_path):
    """A minimal byte-level BPE vocabulary in CLIP's format, written by the test."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in letters:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    vocab["ca"] = len(vocab)
    vocab["cat</w>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\n")
    tok = load_tokenizer(str(tmp_path))
    ids = tok(["a cat"], padding="max_length", max_length=8)["input_ids"][0]
    assert ids[:4] == [0, vocab["a</w>"], vocab["cat</w>"], 1]


def test_clip_score_is_100_times_the_clipped_cosine(reference):
    model, path = reference
    clip, params, _ = load_clip(path)
    ids, mask, _ = inputs()
    images = np.random.default_rng(1).integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
    scores = np.asarray(
        per_image_clip_scores(
            *clip_embeddings(clip, params, jnp.asarray(images), jnp.asarray(ids), jnp.asarray(mask))
        )
    )
    pixels = np.asarray(clip_preprocess(jnp.asarray(images), 30)).transpose(0, 3, 1, 2)
    assert pixels.shape == (3, 3, 30, 30)
    with torch.no_grad():
        i = model.get_image_features(pixel_values=torch.tensor(pixels))
        t = model.get_text_features(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    i = getattr(i, "pooler_output", i).numpy()
    t = getattr(t, "pooler_output", t).numpy()
    cos = np.sum(i * t, -1) / np.linalg.norm(i, axis=-1) / np.linalg.norm(t, axis=-1)
    np.testing.assert_allclose(scores, 100 * np.maximum(cos, 0), atol=1e-3)
    assert np.all(scores >= 0) and np.all(scores <= 100)
