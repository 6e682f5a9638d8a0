"""The classifier task: the model, training and test accuracy, and classifier-guided
sampling through the app (the guidance maths are tested in tests/diffusion)."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from diffax_lab.errors import ConfigError
from diffax_lab.models.classifier import Classifier
from diffax_lab.modes import evaluate, sample, train
from diffax_lab.sharding import make_mesh
from diffax_lab.tasks import registry
from tests.helpers import load_config, tiny_config, write_fake_idx

pytestmark = pytest.mark.slow  # end-to-end: `make test-fast` skips it


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory):
    return write_fake_idx(tmp_path_factory.mktemp("idx"), n_train=512, n_test=128)


def classifier_config(data_dir, *variants, **overrides):
    config = load_config("classifier.py", ",".join(("tiny", *variants)))
    config.data.dir = str(data_dir)
    config.data.num_examples = 0
    for dotted, value in overrides.items():
        section, name = dotted.split(".")
        config[section][name] = value
    return config


def test_classifier_outputs_features_and_depends_on_time():
    model = Classifier(num_classes=7, base_channels=16, channel_mult=(1, 2), num_groups=8)
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 16, 16, 1))
    params = model.init(jax.random.PRNGKey(1), x, jnp.zeros(3))["params"]
    # Zero-initialised residual branches hide t at init; random weights expose it.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    params = tree.unflatten(
        [0.1 * jax.random.normal(k, p.shape) for k, p in zip(keys, leaves, strict=True)]
    )
    logits, feats = model.apply({"params": params}, x, jnp.zeros(3), return_features=True)
    assert logits.shape == (3, 7) and feats.shape == (3, 32)
    noisy = model.apply({"params": params}, x, jnp.full((3,), 0.5))
    assert float(jnp.max(jnp.abs(noisy - logits))) > 1e-3


def test_clean_classifier_learns_and_reports_test_accuracy(fake_data, tmp_path):
    """The fake garments' heights encode their labels in pairs (labels 2k and 2k+1 draw the
    same height), so the best possible accuracy is 50% and chance is 10%: 150 steps must reach
    30% on held-out images, and --mode=eval writes that accuracy with its image count."""
    config = classifier_config(
        fake_data,
        "clean",
        **{
            "train.num_steps": 150,
            "optim.lr": 3e-3,
            "optim.ema_decay": 0.0,
            "eval.num_examples": 128,
        },
    )
    workdir = str(tmp_path / "clean")
    train.run(config, workdir)
    report = evaluate.run(config, workdir)
    assert report["num_examples"] == 128 and set(report) >= {"test_accuracy", "step"}
    assert report["test_accuracy"] > 0.3, report
    with open(os.path.join(workdir, "eval", "step_000150.json")) as f:
        assert json.load(f)["test_accuracy"] == report["test_accuracy"]


@pytest.fixture(scope="module")
def guided_runs(tiny_data, tiny_run, tmp_path_factory):
    """A tiny unconditional DDPM (tests/conftest.py's shared run) and a tiny
    noise-conditioned classifier on the same data."""
    clf_dir = str(tmp_path_factory.mktemp("guided") / "clf")
    train.run(classifier_config(tiny_data), clf_dir)
    ddpm_dir = str(tmp_path_factory.mktemp("guided_ddpm") / "ddpm")
    shutil.copytree(tiny_run[1], ddpm_dir)  # sampling writes into it
    return ddpm_dir, clf_dir


def test_noisy_classifier_reports_accuracy_per_noise_level(tiny_data, guided_runs):
    _, clf_dir = guided_runs
    report = evaluate.run(classifier_config(tiny_data), clf_dir)
    for key in (
        "test_accuracy",
        "test_accuracy_t0.25",
        "test_accuracy_t0.5",
        "test_accuracy_t0.75",
    ):
        assert 0.0 <= report[key] <= 1.0


def test_classifier_guided_sampling_through_the_app(tiny_data, guided_runs):
    """Unconditional model + classifier: labelled samples, one sweep row per scale s, and
    the guidance reaches the pixels (s = 3 differs from s = 0 from the same noise)."""
    ddpm_dir, clf_dir = guided_runs
    config = tiny_config(
        tiny_data,
        **{
            "sample.classifier_scale": 3.0,
            "sample.classifier_workdir": clf_dir,
            "sample.labels": (1, 8),
            "sample.num": 2,
            "sample.batch_size": 2,
            "sample.num_steps": 10,
            "sample.sweep_scales": (0.0, 3.0),
        },
    )
    out = sample.run(config, ddpm_dir)
    assert out["npz"].endswith("_s3.npz")
    with Image.open(os.path.join(ddpm_dir, "samples", "guidance_sweep.png")) as img:
        assert img.size[1] == 2 * (2 * 34 + 2)  # rows s = 0 and s = 3, 32x32 tiles, 2x
    sweep = np.asarray(Image.open(os.path.join(ddpm_dir, "samples", "guidance_sweep.png")))
    top, bottom = sweep[: sweep.shape[0] // 2], sweep[sweep.shape[0] // 2 :]
    assert np.abs(top.astype(int) - bottom.astype(int)).max() > 0


def test_a_classifier_of_another_schedule_or_size_is_refused(fake_data):
    mesh = make_mesh(1)
    model = registry.build(tiny_config(fake_data), mesh)
    other = classifier_config(fake_data, **{"diffusion.schedule": "cosine"})
    with pytest.raises(ConfigError, match=r"trained on x_t of the cosine schedule"):
        model.check_guidance_classifier(registry.build(other, mesh))
    other = classifier_config(fake_data, **{"data.image_size": 16})
    with pytest.raises(ConfigError, match=r"takes 16x16x1 images, the model makes 32x32x1"):
        model.check_guidance_classifier(registry.build(other, mesh))
