"""The CLIP score against torchmetrics' own numbers.

A tiny random CLIP (transformers' CLIPModel) and a tiny CLIP tokenizer are saved to a
directory; torchmetrics' ``clip_score`` and ``CLIPScore`` load them through a callable
(its documented way to use a model that is not one of its hub names), and the lab loads the
same directory with ``load_clip`` / ``load_tokenizer``. Images are at the model's size, so
neither side resizes (the lab's resize is JAX's bicubic, not PIL's).
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torchmetrics.functional.multimodal import clip_score as tm_clip_score
from torchmetrics.multimodal import CLIPScore
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from diffax_lab.metrics.clip_score import clip_score, per_image_clip_scores
from diffax_lab.models.clip import clip_embeddings
from diffax_lab.models.clip_io import load_clip, load_tokenizer

SIZE = 30
LETTERS = "abcdefghijklmnopqrstuvwxyz"
TEXT = dict(
    vocab_size=60,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=16,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)
VISION = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=SIZE,
    patch_size=6,
)
CAPTIONS = ["a cat", "dog", "big red cat", "a small dog", "sky", "the sea", "one tree", "cats"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A random CLIP and a letter-level BPE tokenizer in CLIP's format, saved together."""
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=24))
    path = tmp_path_factory.mktemp("tiny_clip")
    model.eval().save_pretrained(str(path), safe_serialization=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in LETTERS:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    return str(path)


class FeaturesAsTensors(torch.nn.Module):
    """A CLIPModel whose get_image_features / get_text_features return the embeddings.

    transformers 5 returns a BaseModelOutputWithPooling (embeddings in pooler_output) where
    4.x returned the tensor; torchmetrics <= 1.9.0 expects the tensor (its unreleased fix,
    Lightning-AI/torchmetrics#3408, unwraps pooler_output the same way)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, *args, **kwargs):
        out = self.model.get_image_features(*args, **kwargs)
        return getattr(out, "pooler_output", out)

    def get_text_features(self, *args, **kwargs):
        out = self.model.get_text_features(*args, **kwargs)
        return getattr(out, "pooler_output", out)


def _torchmetrics_model(path):
    """The callable torchmetrics takes as model_name_or_path: (model, processor)."""

    def load():
        processor = CLIPProcessor(
            image_processor=CLIPImageProcessor(
                size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}
            ),
            tokenizer=load_tokenizer(path),
        )
        return FeaturesAsTensors(CLIPModel.from_pretrained(path).eval()), processor

    return load


def _images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def _ours(path, images, captions):
    clip, params, _ = load_clip(path)
    tokens = load_tokenizer(path)(captions, padding=True, return_tensors="np")
    return clip_embeddings(
        clip,
        params,
        jnp.asarray(images),
        jnp.asarray(tokens["input_ids"]),
        jnp.asarray(tokens["attention_mask"]),
    )


def _theirs(path, images, captions):
    with torch.no_grad():
        score = tm_clip_score(
            torch.from_numpy(images).permute(0, 3, 1, 2), captions, _torchmetrics_model(path)
        )
    return float(score)


def test_clip_score_is_torchmetrics_clip_score(clip_dir):
    images = _images(len(CAPTIONS), seed=1)
    img, txt = _ours(clip_dir, images, CAPTIONS)
    ours = float(clip_score(img, txt))
    theirs = _theirs(clip_dir, images, CAPTIONS)
    assert ours == pytest.approx(theirs, abs=1e-3)
    # The clamp acts on the mean: the mean of per-pair clamped scores is another number
    # here, because this random CLIP gives some pairs a negative cosine.
    per_pair = np.asarray(per_image_clip_scores(img, txt))
    assert np.any(per_pair == 0.0), per_pair
    assert abs(float(np.mean(per_pair)) - theirs) > 0.1


def test_negative_mean_scores_zero_like_torchmetrics(clip_dir):
    """A batch whose mean cosine is negative although one pair's is positive (the pairs with
    a negative cosine and the least positive one): torchmetrics gives 0, the mean of
    per-pair scores does not."""
    images = _images(len(CAPTIONS), seed=1)
    img, txt = _ours(clip_dir, images, CAPTIONS)
    unclamped = np.sum(np.asarray(img) * np.asarray(txt), -1) / (
        np.linalg.norm(img, axis=-1) * np.linalg.norm(txt, axis=-1)
    )
    positive = np.flatnonzero(unclamped > 0)
    pick = [*np.flatnonzero(unclamped < 0), positive[np.argmin(unclamped[positive])]]
    assert unclamped[pick].mean() < 0 < unclamped[pick].max(), unclamped
    captions = [CAPTIONS[i] for i in pick]
    theirs = _theirs(clip_dir, images[pick], captions)
    assert theirs == 0.0
    assert float(clip_score(img[np.asarray(pick)], txt[np.asarray(pick)])) == 0.0
    assert float(np.mean(per_image_clip_scores(img[np.asarray(pick)], txt[np.asarray(pick)]))) > 0


def test_clip_score_over_updates_is_torchmetrics_clipscore(clip_dir):
    """torchmetrics' CLIPScore accumulates the unclamped sum over updates and clamps the
    mean once in compute: clip_score of all pairs together."""
    images = _images(len(CAPTIONS), seed=2)
    metric = CLIPScore(model_name_or_path=_torchmetrics_model(clip_dir))
    with torch.no_grad():
        for part in (slice(0, 3), slice(3, None)):
            metric.update(torch.from_numpy(images[part]).permute(0, 3, 1, 2), CAPTIONS[part])
        theirs = float(metric.compute())
    img, txt = _ours(clip_dir, images, CAPTIONS)
    assert float(clip_score(img, txt)) == pytest.approx(theirs, abs=1e-3)
