"""The autoencoder task: configs/vae.py:tiny trained for a few steps through the modes, its
reconstruction evaluator against a direct computation, and the exported diffusers folder."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax_lab import sharding
from diffax_lab.data import load_split
from diffax_lab.diffusion import latent
from diffax_lab.errors import ConfigError
from diffax_lab.models import get_model
from diffax_lab.models.autoencoder_kl_io import load_autoencoder_kl
from diffax_lab.models.vae import AutoencoderKL
from diffax_lab.modes import evaluate, sample, train
from diffax_lab.tasks import registry
from tests.helpers import load_config, write_fake_idx


def vae_config(data_dir):
    config = load_config("vae.py", "tiny")
    config.data.dir, config.data.num_examples = str(data_dir), 0
    return config


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    data = write_fake_idx(tmp_path_factory.mktemp("idx"), n_train=64, n_test=32)
    config = vae_config(data)
    workdir = str(tmp_path_factory.mktemp("vae"))
    state = train.run(config, workdir)
    return config, workdir, jax.device_get(state["ema_params"])


def jitted(model, method="__call__"):
    """model.apply(params, *args, method=method), compiled once (op by op is slower here)."""
    return jax.jit(lambda params, *args: model.apply({"params": params}, *args, method=method))


@pytest.mark.slow  # trains the module's shared vae run
def test_trains_samples_and_evaluates_through_the_modes(vae_run):
    config, workdir, params = vae_run
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [x["step"] for x in lines] == [2, 4, 6]
    assert lines[-1]["reconstruction"] < lines[0]["reconstruction"]  # it learns
    assert lines[-1]["psnr"] > lines[0]["psnr"]
    assert all(x["kl"] > 0 for x in lines)

    out = sample.run(config, workdir)
    n = config.sample.num
    assert out["samples"].shape == (n, 32, 32, 1) and out["samples"].dtype == np.uint8
    assert out["real"].shape == out["reconstructed"].shape == (n, 32, 32, 1)
    assert os.path.exists(out["reconstructions"]) and os.path.exists(out["grid"])
    with np.load(out["npz"]) as f:
        np.testing.assert_array_equal(f["reconstructed"], out["reconstructed"])

    report = evaluate.run(config, workdir)
    assert report["step"] == 6 and report["recon_num_examples"] == 32
    assert np.isfinite(report["test_loss"]) and report["rate_bpd"] > 0
    assert os.path.exists(os.path.join(workdir, "eval", "step_000006.json"))
    # The reconstruction evaluator, computed here directly from the EMA weights.
    x = load_split(config.data, "test")[0][:32].astype(np.float32) / 127.5 - 1.0
    out = jitted(get_model(config))(params["autoencoder"], x)
    x_rec, mean, logvar = (np.asarray(a, np.float64) for a in out)
    mse = np.mean((x_rec - x) ** 2, axis=(1, 2, 3))
    kl_nats = 0.5 * np.sum(mean**2 + np.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
    assert report["recon_mse"] == pytest.approx(mse.mean(), rel=1e-4)
    assert report["recon_l1"] == pytest.approx(np.abs(x_rec - x).mean(), rel=1e-4)
    assert report["recon_psnr"] == pytest.approx(np.mean(10 * np.log10(4 / mse)), rel=1e-4)
    assert report["recon_psnr_of_mean_mse"] == pytest.approx(10 * np.log10(4 / mse.mean()))
    assert report["rate_bpd"] == pytest.approx(np.mean(kl_nats / (1024 * np.log(2))), rel=1e-4)


@pytest.mark.slow  # trains the module's shared vae run
def test_exported_hf_vae_loads_and_decodes_identically(vae_run):
    config, workdir, params = vae_run
    module, loaded, ae = load_autoencoder_kl(os.path.join(workdir, "hf_vae"))
    assert ae.block_out_channels == tuple(config.autoencoder.block_out_channels)
    assert (ae.latent_channels, ae.in_channels, ae.sample_size) == (4, 1, 32)
    z = jax.random.normal(jax.random.key(1), (3, 8, 8, 4))
    # The same network (up to the scaling_factor metadata): one compiled function for both.
    assert dataclasses.replace(ae, scaling_factor=0.18215) == get_model(config).config
    decode = jitted(module, "decode")
    np.testing.assert_array_equal(
        np.asarray(decode(loaded, z)), np.asarray(decode(params["autoencoder"], z))
    )
    # scaling_factor is LDM's 1 / std of the training latents: scaled, a fresh posterior
    # draw of the training images has unit standard deviation.
    x = load_split(config.data, "train")[0][:64].astype(np.float32) / 127.5 - 1.0
    mean, logvar = jitted(module, "encode")(loaded, x)
    z = latent.sample_posterior(jax.random.key(7), mean, logvar)
    assert float(jnp.std(z * ae.scaling_factor)) == pytest.approx(1.0, abs=0.03)
    assert ae.scaling_factor != pytest.approx(1.0, abs=0.05)  # it was estimated, not kept


@pytest.mark.slow  # trains the module's shared vae run
def test_a_latent_model_gets_the_same_latents_from_the_run_and_from_its_hf_vae(vae_run, tmp_path):
    """tasks/latent_diffusion.py takes this run's workdir (EMA weights restored through the
    frozen_autoencoder hook) or its exported diffusers folder alike."""
    config, workdir, _ = vae_run
    imgs = load_split(config.data, "train")[0][:16]
    moments = []
    for source, kind in ((workdir, "run"), (os.path.join(workdir, "hf_vae"), "diffusers")):
        ldm = load_config("ldm.py", "tiny")
        ldm.data.dir, ldm.data.num_examples = config.data.dir, 0
        ldm.latent.autoencoder = source
        task = registry.build(ldm, sharding.make_mesh(1))
        task.load_resources(str(tmp_path / kind), "train")
        assert task.ae_kind == kind and task.image_shape == (8, 8, 4)
        moments.append(task.posteriors(imgs, "train", str(tmp_path / kind)))
    np.testing.assert_array_equal(moments[0], moments[1])


def test_the_model_registry_builds_the_vae_from_the_autoencoder_section(tmp_path):
    config = vae_config(tmp_path)
    config.autoencoder.latent_channels = 3
    config.autoencoder.block_out_channels = (8, 16)
    model = get_model(config)
    assert isinstance(model, AutoencoderKL)
    assert model.config.latent_shape(32, 32) == (16, 16, 3)
    assert model.config.in_channels == model.config.out_channels == 1


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"autoencoder.discriminator": True, "autoencoder.disc_loss": "wgan"}, "disc_loss"),
        ({"model.name": "unet"}, "trains 'autoencoder_kl'"),
        ({"autoencoder.norm_num_groups": 3}, "norm_num_groups=3 must divide"),
        ({"data.image_size": 30}, "multiple of the autoencoder's downsampling factor 4"),
        ({"autoencoder.reconstruction": "lpips"}, "autoencoder.reconstruction"),
        ({"eval.metrics": ("bpd",)}, "supports"),
    ],
)
def test_bad_configs_are_refused_before_anything_compiles(tmp_path, overrides, match):
    config = vae_config(tmp_path)
    for k, v in overrides.items():
        section, field = k.split(".")
        config[section][field] = v
    with pytest.raises(ConfigError, match=match):
        registry.check_config(config)
