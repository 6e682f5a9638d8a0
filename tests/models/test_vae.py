"""The Flax KL autoencoder against diffusers' PyTorch ``AutoencoderKL`` (installed for tests
only): loading its folders, exporting ours to them, and what the loader refuses."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from safetensors.numpy import load_file, save_file

from diffax_lab.diffusion import latent
from diffax_lab.models.autoencoder_kl_io import (
    AutoencoderKLLoadError,
    load_autoencoder_kl,
    save_autoencoder_kl,
)
from diffax_lab.models.vae import AutoencoderKL, AutoencoderKLConfig

# Two and three levels; one without the mid-block attention (and without post_quant_conv,
# another option diffusers has); other input/output widths than RGB.
CONFIGS = {
    "2_levels": dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=3),
    "3_levels": dict(
        block_out_channels=(8, 16, 16),
        layers_per_block=2,
        latent_channels=4,
        in_channels=1,
        out_channels=2,
    ),
    "no_mid_attention": dict(
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=2,
        mid_block_add_attention=False,
        use_post_quant_conv=False,
    ),
}


def torch_vae(seed, **kwargs):
    levels = len(kwargs["block_out_channels"])
    torch.manual_seed(seed)
    model = TorchAutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        norm_num_groups=4,
        sample_size=16,
        **kwargs,
    ).eval()
    with torch.no_grad():  # GroupNorm starts at (1, 0): move it, so the mapping shows
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    return model


def jitted(model, method="__call__"):
    """model.apply(params, *args, method=method), compiled once (op by op is slower here)."""
    return jax.jit(lambda params, *args: model.apply({"params": params}, *args, method=method))


def nhwc(t):
    return np.asarray(t.detach().permute(0, 2, 3, 1).numpy())


def nchw(a):
    return torch.from_numpy(np.array(a)).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    """A random diffusers AutoencoderKL saved with save_pretrained, and the Flax load of it."""
    model = torch_vae(0, **CONFIGS[request.param])
    path = str(tmp_path_factory.mktemp(request.param))
    model.save_pretrained(path, safe_serialization=True)
    flax_model, params, config = load_autoencoder_kl(path)
    return model, path, flax_model, params, config


def test_encoder_and_decoder_equal_diffusers(pair):
    model, _, flax_model, params, config = pair
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 16, 16, config.in_channels)).astype(np.float32)
    with torch.no_grad():
        posterior = model.encode(nchw(x)).latent_dist
    mean, logvar = jitted(flax_model, "encode")(params, jnp.asarray(x))
    assert mean.shape == (2, *config.latent_shape(16, 16))
    np.testing.assert_allclose(mean, nhwc(posterior.mean), atol=1e-4)
    np.testing.assert_allclose(logvar, nhwc(posterior.logvar), atol=1e-4)
    # The KL term is diffusers' DiagonalGaussianDistribution.kl().
    np.testing.assert_allclose(
        latent.kl_to_standard_normal(mean, logvar), posterior.kl().numpy(), rtol=1e-4
    )

    z = rng.normal(size=mean.shape).astype(np.float32)
    with torch.no_grad():
        ref = model.decode(nchw(z)).sample
    out = jitted(flax_model, "decode")(params, jnp.asarray(z))
    assert out.shape == (2, 16, 16, config.out_channels)
    np.testing.assert_allclose(out, nhwc(ref), atol=1e-4)


def test_export_round_trip_loads_in_diffusers(pair, tmp_path):
    model, _, _, params, config = pair
    save_autoencoder_kl(str(tmp_path), config, params)
    again = TorchAutoencoderKL.from_pretrained(str(tmp_path)).eval()
    for key in ("block_out_channels", "latent_channels", "mid_block_add_attention"):
        assert again.config[key] == model.config[key] or list(again.config[key]) == list(
            model.config[key]
        )
    want, got = model.state_dict(), again.state_dict()
    assert sorted(want) == sorted(got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)


@pytest.fixture(scope="module")
def flax_vae():
    """A VAE initialised here (so trainable here), its params and its jitted forward."""
    config = AutoencoderKLConfig(
        block_out_channels=(8, 16), norm_num_groups=4, latent_channels=2, layers_per_block=1
    )
    model = AutoencoderKL(config)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    params = jax.jit(model.init)(jax.random.key(1), x)["params"]
    return model, params, config, x, jitted(model)


def test_flax_initialised_vae_exports_to_diffusers(flax_vae, tmp_path):
    """A VAE made here is one diffusers runs the same way."""
    model, params, config, x, forward = flax_vae
    save_autoencoder_kl(str(tmp_path), config, params)
    peer = TorchAutoencoderKL.from_pretrained(str(tmp_path)).eval()
    rec, mean, _ = forward(params, x)
    with torch.no_grad():
        ref_mean = peer.encode(nchw(x)).latent_dist.mean
        ref_rec = peer.decode(ref_mean).sample
    np.testing.assert_allclose(mean, nhwc(ref_mean), atol=1e-4)
    np.testing.assert_allclose(rec, nhwc(ref_rec), atol=1e-4)


def test_call_with_a_key_decodes_the_reparameterised_sample(flax_vae):
    model, params, _, x, forward = flax_vae
    key = jax.random.key(3)
    rec, mean, logvar = forward(params, x, key)
    z = latent.sample_posterior(key, mean, logvar)
    want = jitted(model, "decode")(params, z)
    np.testing.assert_allclose(rec, want, atol=1e-5)
    rec_mean, _, _ = forward(params, x)
    assert not np.allclose(rec, rec_mean, atol=1e-3)  # the sample is not the mean


def test_bfloat16_compute_stays_close_to_float32(flax_vae):
    model, params, config, x, forward = flax_vae
    low = jitted(AutoencoderKL(config, dtype=jnp.bfloat16))
    rec, mean, logvar = forward(params, x)
    rec_bf16, mean_bf16, logvar_bf16 = low(params, x)
    assert rec_bf16.dtype == mean_bf16.dtype == jnp.float32
    for a, b in ((rec, rec_bf16), (mean, mean_bf16), (logvar, logvar_bf16)):
        assert 0 < float(jnp.max(jnp.abs(a - b))) < 0.05 * float(jnp.max(jnp.abs(a)))


def test_deprecated_attention_names_load(tmp_path):
    """Folders saved before diffusers 0.14 name the attention query/key/value/proj_attn."""
    model = torch_vae(4, **CONFIGS["2_levels"])
    model.save_pretrained(str(tmp_path / "new"), safe_serialization=True)
    _, params, _ = load_autoencoder_kl(str(tmp_path / "new"))
    old = {}
    for k, v in model.state_dict().items():
        for new, dep in (("to_q", "query"), ("to_k", "key"), ("to_v", "value")):
            k = k.replace(f".{new}.", f".{dep}.")
        old[k.replace(".to_out.0.", ".proj_attn.")] = v.numpy()
    assert sum(".proj_attn." in k for k in old) == 4  # weight and bias, encoder and decoder
    os.makedirs(tmp_path / "old")
    save_file(old, str(tmp_path / "old" / "diffusion_pytorch_model.safetensors"))
    shutil.copy(tmp_path / "new" / "config.json", tmp_path / "old" / "config.json")
    _, loaded, _ = load_autoencoder_kl(str(tmp_path / "old"))
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)


def test_force_upcast_keeps_float32(pair):
    _, path, _, _, config = pair
    assert config.force_upcast
    model, _, _ = load_autoencoder_kl(path, dtype=jnp.bfloat16)
    assert model.dtype == jnp.float32


# --- refusals -----------------------------------------------------------------------------


def _config_only(tmp_path, **changes):
    """A folder with config.json only: a refusal from it shows no weight was read."""
    d = AutoencoderKLConfig(block_out_channels=(8, 16), norm_num_groups=4).to_diffusers_dict()
    d.update(changes)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(d, f)
    return str(tmp_path)


def test_refuses_a_pickle_with_the_command_that_converts_it(tmp_path):
    path = _config_only(tmp_path)
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(AutoencoderKLLoadError, match="pickle") as e:
        load_autoencoder_kl(path)
    msg = str(e.value)
    assert "save_pretrained" in msg and "safe_serialization=True" in msg and path in msg


@pytest.mark.parametrize(
    "changes,match",
    [
        (
            {"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]},
            r"down_block_types contains \['AttnDownEncoderBlock2D'\]",
        ),
        ({"up_block_types": ["UpDecoderBlock2D"]}, "up_block_types has 1 entries"),
        ({"_class_name": "AutoencoderTiny"}, "AutoencoderTiny"),
        ({"act_fn": "gelu"}, "act_fn='gelu'"),
        ({"norm_type": "spatial"}, r"\['norm_type'\]"),
        ({"norm_num_groups": 3}, "norm_num_groups=3"),
    ],
)
def test_refuses_what_it_cannot_represent_before_reading_weights(tmp_path, changes, match):
    path = _config_only(tmp_path, **changes)
    with pytest.raises(AutoencoderKLLoadError, match=match):
        load_autoencoder_kl(path)


def test_mismatched_shapes_name_the_key(pair, tmp_path):
    _, path, _, _, _ = pair
    weights = load_file(os.path.join(path, "diffusion_pytorch_model.safetensors"))
    key = "decoder.conv_in.weight"
    weights[key] = np.zeros((3, *weights[key].shape[1:]), np.float32)
    save_file(weights, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    shutil.copy(os.path.join(path, "config.json"), tmp_path / "config.json")
    with pytest.raises(AutoencoderKLLoadError, match=r"decoder\.conv_in\.weight has shape \(3,"):
        load_autoencoder_kl(str(tmp_path))

    del weights[key]
    save_file(weights, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(AutoencoderKLLoadError, match=r"missing keys \['decoder\.conv_in\.weight'"):
        load_autoencoder_kl(str(tmp_path))
