"""Text-to-image through CLIP: image embeddings cached for training, a prompt grid from
text embeddings with classifier-free guidance."""

import glob
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from diffax_lab.evaluators.clip_score import clip_report
from diffax_lab.models.text_context import ClipEmbedder
from diffax_lab.modes import evaluate, sample, train
from diffax_lab.sharding import make_mesh
from diffax_lab.tasks import registry
from tests.helpers import load_config


@pytest.mark.slow
def test_text2img_trains_on_cached_image_embeddings_and_draws_prompts(
    tiny_data, tiny_clip, tmp_path
):
    data = tiny_data  # 64 train and 32 test fake images, and a CLIP trained on them (conftest)
    config = load_config("text2img.py", "tiny")
    config.data.dir, config.data.num_examples = str(data), 0
    config.text.clip_dir = os.path.join(tiny_clip[1], "hf_clip")
    workdir = str(tmp_path / "t2i")
    train.run(config, workdir)
    cached = glob.glob(os.path.join(workdir, "clip_embeddings_train_*.npz"))
    assert len(cached) == 1
    mtime = os.path.getmtime(cached[0])
    task = registry.build(config, make_mesh(1))  # what a resumed run does first
    task.load_resources(workdir, "train")
    _, emb = task.train_data(workdir)  # the embeddings are reused, not recomputed
    assert os.path.getmtime(cached[0]) == mtime and emb.shape == (64, config.model.cond_dim)

    # The conditioning CLIP computes in model.dtype (it was loaded in float32 whatever the
    # config said), and its cached embeddings are keyed by that dtype.
    bf16 = ClipEmbedder(config.text.clip_dir, dtype=jnp.bfloat16)
    assert bf16.model.dtype == jnp.bfloat16
    assert bf16.name != ClipEmbedder(config.text.clip_dir).name

    out = sample.run(config, workdir)
    grid = out["grid"].replace(".png", "_prompts.png")
    with Image.open(grid) as img:  # two prompts: two rows of two 28x28 tiles, scaled 2x
        assert img.size[1] == 2 * (2 * 30 + 2)

    # --mode=eval: the test loss conditioned on the test images' own embeddings, and the
    # CLIP scores of samples drawn from the class prompts beside real images'.
    config.eval.clip_dir = config.text.clip_dir  # "independent": here the same CLIP again
    report = evaluate.run(config, workdir)
    assert report["step"] == 4 and report["num_generated"] == config.eval.num_samples
    assert np.isfinite(report["test_loss"])
    for key in ("clip_score", "clip_score_shuffled", "real_clip_score", "real_clip_score_shuffled"):
        assert 0.0 <= report[key] <= 100.0
    assert 0.0 <= report["clip_accuracy"] <= 1.0 and report["num_real_clip"] == 32
    assert report["indep_clip_dir"] == config.text.clip_dir
    for key in ("clip_score", "clip_score_shuffled", "clip_accuracy", "real_clip_score"):
        assert report["indep_" + key] == pytest.approx(report[key], rel=1e-5)
    assert glob.glob(os.path.join(workdir, "clip_embeddings_test_*.npz"))
    tagged = glob.glob(os.path.join(workdir, "eval", "step_000004_ddpm100_w2_s0_n8.json"))
    with open(tagged[0]) as f:
        assert json.load(f)["clip_score"] == report["clip_score"]


def test_clip_report_scores_matched_shuffled_and_real_pairs():
    """Orthonormal class prompts: a sample embedded exactly at its prompt scores 100 and is
    CLIP's zero-shot choice; a mismatched pair scores 0, so the shuffled score is 100 times
    the fraction of the permutation that keeps the class."""
    k, n = 4, 40
    prompts = np.eye(k, 8)
    fake_y = np.arange(n) % k
    real_y = np.arange(n) % k
    fake = 3.0 * prompts[fake_y]  # scale does not matter: cosines
    real = prompts[(real_y + 1) % k]  # every real image looks like the next class
    r = clip_report(prompts, fake, fake_y, real, real_y, seed=0)
    assert r["clip_score"] == pytest.approx(100.0) and r["clip_score_sem"] == 0.0
    assert r["clip_accuracy"] == 1.0
    kept = np.mean(fake_y[np.random.default_rng(0).permutation(n)] == fake_y)
    assert 0 < kept < 1
    assert r["clip_score_shuffled"] == pytest.approx(100.0 * kept)
    assert r["real_clip_score"] == pytest.approx(0.0) and r["real_clip_accuracy"] == 0.0
    assert r["num_real_clip"] == n
    # A negative mean cosine is clamped to 0, as torchmetrics' CLIP score does.
    r = clip_report(prompts, -prompts[fake_y], fake_y, real, real_y)
    assert r["clip_score"] == 0.0
