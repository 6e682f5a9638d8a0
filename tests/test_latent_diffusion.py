"""Latent diffusion: a U-Net trained on the cached, scaled latents of a frozen autoencoder
(a diffusers folder, or a lab autoencoder run), sampled and judged as decoded images."""

import copy
import glob
import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from diffax_lab import sharding
from diffax_lab.data import load_split
from diffax_lab.errors import ConfigError
from diffax_lab.models import autoencoder_kl_config, get_model
from diffax_lab.models.autoencoder_kl_io import WEIGHTS_NAME, save_autoencoder_kl
from diffax_lab.modes import evaluate, sample, train
from diffax_lab.tasks import registry
from tests.helpers import load_config, write_fake_idx


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_fake_idx(tmp_path_factory.mktemp("idx"), n_train=64, n_test=32)


@pytest.fixture(scope="module")
def hf_vae(data, tmp_path_factory):
    """A random tiny AutoencoderKL in diffusers' layout whose latents are far from unit
    variance (means x10, posterior std ~ e^-4), as a pretrained VAE's are."""
    config = load_config("vae.py", "tiny")
    init = jax.jit(get_model(config).init)  # compiled once: op by op is slower
    params = jax.tree.map(np.array, init(jax.random.key(0), np.zeros((1, 32, 32, 1)))["params"])
    q = params["quant_conv"]
    c = config.autoencoder.latent_channels
    q["kernel"][..., :c] *= 10.0
    q["bias"][c:] = -8.0
    path = str(tmp_path_factory.mktemp("hf_vae"))
    save_autoencoder_kl(path, autoencoder_kl_config(config), params)
    return path


def ldm_config(data, autoencoder, **overrides):
    config = load_config("ldm.py", "tiny")
    config.data.dir, config.data.num_examples = str(data), 0
    config.latent.autoencoder = str(autoencoder)
    for k, v in overrides.items():
        section, field = k.split(".")
        config[section][field] = v
    return config


@pytest.fixture(scope="module")
def ldm_run(data, hf_vae, tmp_path_factory):
    config = ldm_config(data, hf_vae)
    workdir = str(tmp_path_factory.mktemp("ldm"))
    train.run(config, workdir)
    return config, workdir


def build(config, workdir, mode):
    """The task as a mode builds it, with its frozen autoencoder loaded."""
    task = registry.build(config, sharding.make_mesh(1))
    task.load_resources(workdir, mode)
    return task


@pytest.mark.slow  # trains the module's shared ldm run
def test_trains_on_latents_then_samples_and_evaluates_decoded_images(ldm_run):
    config, workdir = ldm_run
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [x["step"] for x in lines] == [2, 4]
    assert all(np.isfinite(x["loss"]) for x in lines)
    assert len(glob.glob(os.path.join(workdir, "latents_train_*.npz"))) == 1

    out = sample.run(config, workdir)
    n = config.sample.num
    assert out["samples"].shape == (n, 32, 32, 1) and out["samples"].dtype == np.uint8
    with np.load(out["npz"]) as f:
        assert f["images"].shape == (n, 32, 32, 1)
    for name in ("guidance_sweep.png", "forward_strip.png", "reverse_strip.png"):
        assert os.path.exists(os.path.join(workdir, "samples", name))

    report = evaluate.run(config, workdir)
    assert report["step"] == 4 and report["num_examples"] == 32
    # eps-prediction MSE on unit-variance latents of an untrained U-Net: about 1.
    assert 0.5 < report["test_loss"] < 2.0


@pytest.mark.slow  # trains the module's shared ldm run
def test_the_estimated_scale_factor_gives_unit_variance_training_latents(ldm_run):
    config, workdir = ldm_run
    with open(os.path.join(workdir, "latent_scale.json")) as f:
        record = json.load(f)
    assert record["estimated"] and record["num_examples"] == 64
    task = build(config, workdir, "eval")
    assert task.image_shape == (8, 8, 4)
    assert task.scale_factor == record["scale_factor"] < 0.5  # the latents' std is > 2
    (cache,) = glob.glob(os.path.join(workdir, "latents_train_*.npz"))
    with np.load(cache) as f:
        moments = f["features"]
    assert moments.shape == (64, 8, 8, 8)
    # The cache holds the encoder's posterior mean | std of the training images.
    x = load_split(config.data, "train")[0][:16].astype(np.float32) / 127.5 - 1.0
    np.testing.assert_allclose(
        np.asarray(task._moments(task.vae_params, x)), moments[:16], rtol=1e-5, atol=1e-6
    )
    # What the U-Net sees: a fresh posterior draw, scaled: unit standard deviation.
    z = np.asarray(task.latents(moments, jax.random.key(5)))
    assert z.std() == pytest.approx(1.0, abs=0.03)
    assert (z / task.scale_factor).std() > 2.0


def test_a_given_scale_factor_is_recorded_and_checked(data, hf_vae, tmp_path):
    config = ldm_config(data, hf_vae, **{"latent.scale_factor": 0.5})
    workdir = str(tmp_path / "given")
    task = build(config, workdir, "train")
    stored, labels = task.train_data(workdir)
    assert task.scale_factor == 0.5 and labels.shape == (64,)
    with open(os.path.join(workdir, "latent_scale.json")) as f:
        record = json.load(f)
    assert record["scale_factor"] == 0.5 and not record["estimated"]
    # The steps draw from the cached posterior moments themselves (model_input passes them).
    (cache,) = glob.glob(os.path.join(workdir, "latents_train_*.npz"))
    with np.load(cache) as f:
        np.testing.assert_allclose(stored, f["features"], atol=1e-6)
    x0, y = task.model_input(stored[:4], labels[:4], None)
    np.testing.assert_array_equal(x0, stored[:4])
    config.latent.scale_factor = 0.25  # not what the run recorded
    with pytest.raises(ConfigError, match="trained with 0.5"):
        build(config, workdir, "sample")


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"sample.clip_x0": 1.0}, "clip_x0=1.0 clips"),
        ({"data.random_flip": True}, "would flip the cached latents"),
        ({"eval.metrics": ("loss", "bpd")}, "supports"),
        ({"sample.classifier_scale": 1.0}, "classifier of noisy latents|classifier_workdir"),
        ({"model.cond_dim": 8}, "cond_dim > 0"),
    ],
)
def test_what_latent_space_cannot_do_is_refused(data, hf_vae, overrides, match):
    with pytest.raises(ConfigError, match=match):
        registry.check_config(ldm_config(data, hf_vae, **overrides))


@pytest.mark.slow  # trains the module's shared ldm run
def test_the_autoencoder_source_is_checked_when_the_task_is_built(data, hf_vae, ldm_run, tmp_path):
    mesh = sharding.make_mesh(1)
    with pytest.raises(ConfigError, match="is not a directory"):
        registry.build(ldm_config(data, tmp_path / "missing"), mesh)
    with pytest.raises(ConfigError, match="is a 'latent_diffusion' run, not an 'autoencoder'"):
        registry.build(ldm_config(data, ldm_run[1]), mesh)
    with pytest.raises(ConfigError, match="use fewer U-Net levels"):
        registry.build(ldm_config(data, hf_vae, **{"model.channel_mult": (1, 1, 1, 1, 1)}), mesh)
    with pytest.raises(ConfigError, match="data.channels=3"):
        registry.build(ldm_config(data, hf_vae, **{"data.channels": 3}), mesh)


@pytest.mark.slow  # trains the module's shared ldm run
def test_a_resumed_run_reuses_the_cached_latents_and_the_recorded_scale(ldm_run, hf_vae, tmp_path):
    config, workdir = ldm_run
    (cache,) = glob.glob(os.path.join(workdir, "latents_train_*.npz"))
    mtime = os.path.getmtime(cache)
    with open(os.path.join(workdir, "latent_scale.json")) as f:
        scale = json.load(f)["scale_factor"]
    task = build(config, workdir, "train")  # what train.run does before its first step
    task.train_data(workdir)
    assert os.path.getmtime(cache) == mtime and task.scale_factor == scale
    config = copy.deepcopy(config)
    config.latent.scale_factor = 0.5
    with pytest.raises(ConfigError, match="resume with that value or use a new --workdir"):
        build(config, workdir, "train").train_data(workdir)
    # Another autoencoder (other weights) is refused for this workdir.
    other = tmp_path / "other_vae"
    shutil.copytree(hf_vae, other)
    cfg = json.loads((other / "config.json").read_text())
    weights = load_file(str(other / WEIGHTS_NAME))
    weights["decoder.conv_out.bias"] = weights["decoder.conv_out.bias"] + 1.0
    save_file(weights, str(other / WEIGHTS_NAME))
    assert cfg["latent_channels"] == 4
    config.latent.scale_factor = 0.0
    config.latent.autoencoder = str(other)
    with pytest.raises(ConfigError, match="trained on the latents of another autoencoder"):
        build(config, workdir, "sample")
