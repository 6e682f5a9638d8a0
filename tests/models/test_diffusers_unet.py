"""diffusers UNet2DModel folders <-> the lab's U-Net, checked against diffusers itself on
randomly initialised models saved with save_pretrained (nothing is downloaded)."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.models.embeddings import Timesteps
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from diffax_lab.diffusion import samplers
from diffax_lab.diffusion.schedules import get_schedule
from diffax_lab.models import ddpm_cifar10_unet
from diffax_lab.models.diffusers_config import unet_config_to_lab
from diffax_lab.models.diffusers_unet import (
    DiffusersFormatError,
    export_pipeline,
    export_unet2d,
    load_unet2d,
    scheduler_config_to_lab,
)
from diffax_lab.models.layers import sinusoidal_embedding
from diffax_lab.models.unet import UNet

T = 1000
# google/ddpm-cifar10-32's layout at reduced width (its config: attention at 16x16 only,
# downsample_padding 0, freq_shift 1, no flip, norm_eps 1e-6, attention_head_dim None).
CIFAR_LAYOUT = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64, 64, 64),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None,
    norm_num_groups=8,
    norm_eps=1e-6,
    flip_sin_to_cos=False,
    freq_shift=1,
    downsample_padding=0,
    center_input_sample=False,
    act_fn="silu",
    time_embedding_type="positional",
    mid_block_scale_factor=1,
    resnet_time_scale_shift="default",
)
# Attention at two levels with several heads, and diffusers' other defaults.
MULTI_HEAD_LAYOUT = dict(
    sample_size=16,
    in_channels=2,
    out_channels=2,
    block_out_channels=(16, 32, 32),
    layers_per_block=1,
    down_block_types=("AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D"),
    attention_head_dim=8,  # 2 heads at 16 channels, 4 at 32 (and in the middle)
    norm_num_groups=8,
    flip_sin_to_cos=True,
    freq_shift=0,
    downsample_padding=1,
    norm_eps=1e-5,
    center_input_sample=True,
    act_fn="gelu",
    num_class_embeds=5,
)
STEPS = (0, 17, 500, 999)


def _random_unet2d(kwargs, seed=0):
    """A UNet2DModel whose every weight is random (its zero inits would hide mistakes)."""
    torch.manual_seed(seed)
    model = UNet2DModel(**kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _torch_out(model, x_nhwc, steps, labels=None):
    x = torch.from_numpy(np.asarray(x_nhwc).transpose(0, 3, 1, 2))
    y = None if labels is None else torch.from_numpy(np.asarray(labels))
    with torch.no_grad():
        out = model(x, torch.as_tensor(steps), class_labels=y).sample.numpy()
    return out.transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cifar_layout"))
    torch_model = _random_unet2d(CIFAR_LAYOUT)
    torch_model.save_pretrained(path)
    model, params, info = load_unet2d(path)
    return dict(path=path, torch=torch_model, model=model, params=params, info=info)


@pytest.mark.parametrize("flip,shift", [(False, 1), (True, 0)])
def test_time_index_offset_embedding_equals_diffusers(flip, shift):
    steps = np.array([0, 1, 17, 999])
    t = jnp.asarray((steps + 1) / T, jnp.float32)  # the lab's time of step i
    x = jnp.zeros((len(steps), 4, 4, 1))

    def sinusoid(offset):
        model = UNet(
            out_channels=1,
            base_channels=32,
            channel_mult=(1,),
            num_res_blocks=1,
            attention_resolutions=(),
            num_groups=8,
            time_scale=float(T),
            time_index_offset=offset,
            time_flip_sin_to_cos=flip,
            time_freq_shift=shift,
        )
        shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, t))
        params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        run = jax.jit(lambda p: model.apply(p, x, t, mutable=["intermediates"])[1])
        return np.asarray(run(params)["intermediates"]["time_sinusoid"][0])

    ref = Timesteps(32, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    with torch.no_grad():
        at_i = ref(torch.as_tensor(steps)).numpy()
        at_i_plus_1 = ref(torch.as_tensor(steps + 1)).numpy()
    # (i + 1) / T * T is i + 1 to float32 rounding: sin/cos arguments up to 1000 rad.
    np.testing.assert_allclose(sinusoid(1.0), at_i, atol=2e-4)  # offset 1: diffusers' i
    np.testing.assert_allclose(sinusoid(0.0), at_i_plus_1, atol=2e-4)  # default: i + 1
    assert np.max(np.abs(at_i - at_i_plus_1)) > 0.1


def test_cifar_layout_matches_diffusers(cifar):
    info = cifar["info"]
    assert info.unet_kwargs["attention_levels"] == (1,)
    assert info.unet_kwargs["downsample_padding"] == 0 and info.num_train_timesteps == T
    assert not info.legacy_attention_names
    steps = np.array(STEPS)
    x = np.random.default_rng(0).standard_normal((len(steps), 32, 32, 3)).astype(np.float32)
    ours = jax.jit(cifar["model"].apply)(cifar["params"], x, jnp.asarray((steps + 1) / T))
    ref = _torch_out(cifar["torch"], x, steps)
    assert float(np.std(ref)) > 0.1
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)


def test_multi_head_attention_levels_classes_match_diffusers(tmp_path):
    torch_model = _random_unet2d(MULTI_HEAD_LAYOUT, seed=1)
    torch_model.save_pretrained(str(tmp_path))
    model, params, info = load_unet2d(str(tmp_path))
    k = info.unet_kwargs
    assert k["attention_levels"] == (0, 2) and k["attention_head_dim"] == 8
    assert k["activation"] == "gelu_exact" and k["num_classes"] == 4 and k["center_input"]
    steps = np.array(STEPS)
    x = np.random.default_rng(1).standard_normal((len(steps), 16, 16, 2)).astype(np.float32)
    y = np.array([1, 4, 0, 2])
    ours = jax.jit(model.apply)(params, x, jnp.asarray((steps + 1) / T), jnp.asarray(y))
    ref = _torch_out(torch_model, x, steps, y)
    assert float(np.std(ref)) > 0.1
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)


def test_legacy_attention_names_load(cifar, tmp_path):
    shutil.copy(os.path.join(cifar["path"], "config.json"), tmp_path / "config.json")
    tensors = load_file(os.path.join(cifar["path"], "diffusion_pytorch_model.safetensors"))
    legacy = {}
    for key, value in tensors.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value")):
            key = key.replace(f".{new}.", f".{old}.")
        legacy[key.replace(".to_out.0.", ".proj_attn.")] = value
    assert any(".proj_attn." in k for k in legacy) and not any(".to_q." in k for k in legacy)
    save_file(legacy, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    _, params, info = load_unet2d(str(tmp_path))
    assert info.legacy_attention_names
    jax.tree.map(np.testing.assert_array_equal, params, cifar["params"])
    # diffusers itself reads the legacy file into the same network.
    reloaded = UNet2DModel.from_pretrained(str(tmp_path)).eval()
    x = np.random.default_rng(2).standard_normal((1, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(
        _torch_out(reloaded, x, [5]), _torch_out(cifar["torch"], x, [5]), atol=1e-5
    )


def test_export_of_loaded_weights_gives_back_the_file(cifar, tmp_path):
    export_unet2d(cifar["model"], cifar["params"], str(tmp_path), num_train_timesteps=T)
    ours = load_file(str(tmp_path / "diffusion_pytorch_model.safetensors"))
    original = load_file(os.path.join(cifar["path"], "diffusion_pytorch_model.safetensors"))
    assert sorted(ours) == sorted(original)
    for key, value in original.items():
        np.testing.assert_array_equal(ours[key], value, err_msg=key)


def _lab_unet_params(model, shape, **kw):
    x = jnp.zeros(shape)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), x, jnp.zeros(shape[:1]), **kw)
    )
    rng = np.random.default_rng(3)
    return jax.tree.map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype), shapes)


def test_export_round_trip_of_a_lab_unet(tmp_path):
    """A lab U-Net as trained (time index offset 0: it embeds i + 1) exports to a pipeline
    whose UNet2DModel, fed diffusers' i, equals it; loading the export gives it back."""
    lab = UNet(
        out_channels=1,
        base_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(8,),
        attention_heads=2,
        num_groups=8,
        num_classes=3,
    )
    y = np.array([0, 3, 1])  # 3 is the null label
    params = _lab_unet_params(lab, (3, 16, 16, 1), y=jnp.asarray(y))
    out = str(tmp_path / "pipe")
    export_pipeline(lab, params, out, schedule="linear", num_timesteps=T, sample_size=16)
    pipe = DDPMPipeline.from_pretrained(out)
    assert pipe.unet.config.num_class_embeds == 4
    x = np.random.default_rng(4).standard_normal((3, 16, 16, 1)).astype(np.float32)
    steps = np.array([0, 250, 999])
    ours = jax.jit(lab.apply)(params, x, jnp.asarray((steps + 1) / T), jnp.asarray(y))
    ref = _torch_out(pipe.unet.eval(), x, steps, y)
    assert float(np.std(ref)) > 0.01
    np.testing.assert_allclose(ref, np.asarray(ours), atol=1e-4, rtol=0)

    # Loading the export gives the lab's parameters back, the first time layer rotated so
    # that embedding i (offset 1) does what embedding i + 1 (offset 0) did.
    reloaded, back, info = load_unet2d(out)
    assert info.scheduler["schedule"] == "linear" and info.num_train_timesteps == T
    assert reloaded.time_index_offset == 1.0 and reloaded.attention_levels == (1,)
    flat, flat_back = (traverse_util.flatten_dict(p["params"]) for p in (params, back))
    assert flat.keys() == flat_back.keys()
    for key in flat:
        if key != ("time_dense0", "kernel"):
            np.testing.assert_array_equal(flat_back[key], flat[key], err_msg=str(key))
    i = jnp.arange(0.0, 1000.0, 37.0)
    np.testing.assert_allclose(
        sinusoidal_embedding(i, 16) @ flat_back[("time_dense0", "kernel")],
        sinusoidal_embedding(i + 1.0, 16) @ flat[("time_dense0", "kernel")],
        atol=1e-4,
    )


@pytest.mark.parametrize("schedule,steps", [("linear", 1000), ("cosine", 100)])
def test_scheduler_config_has_the_lab_schedule(tmp_path, schedule, steps):
    lab = UNet(
        base_channels=8,
        channel_mult=(1,),
        num_res_blocks=1,
        num_groups=4,
        attention_resolutions=(),
        time_scale=steps,
    )
    params = _lab_unet_params(lab, (1, 8, 8, 3))
    export_pipeline(
        lab, params, str(tmp_path), schedule=schedule, num_timesteps=steps, prediction="v"
    )
    sched = DDPMScheduler.from_pretrained(str(tmp_path / "scheduler"))
    assert sched.config.prediction_type == "v_prediction"
    np.testing.assert_allclose(
        sched.alphas_cumprod.numpy(),
        np.asarray(get_schedule(schedule, steps).alphas_cumprod),
        rtol=2e-5,
    )
    with open(tmp_path / "scheduler" / "scheduler_config.json") as f:
        back = scheduler_config_to_lab(json.load(f))
    assert back == dict(
        schedule=schedule, num_timesteps=steps, prediction="v", clip_x0=1.0, variance="beta_tilde"
    )


@pytest.mark.slow  # a whole sampling loop in both libraries
def test_ddim_10_steps_matches_diffusers(cifar):
    """The lab's DDIM sampler on the converted weights against diffusers' DDIMScheduler loop
    on the original, from the same x_T. diffusers steps from t to t - T / n, so its
    "trailing" grid 999, 899, ..., 99 (then alpha_bar = 1) is the lab's respaced schedule."""
    n = 10
    ref_sched = DDIMScheduler(
        num_train_timesteps=T,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        clip_sample=True,
        set_alpha_to_one=True,
        timestep_spacing="trailing",
    )
    ref_sched.set_timesteps(n)
    indices = np.sort(ref_sched.timesteps.numpy())
    np.testing.assert_array_equal(indices, np.arange(99, T, 100))
    x_T = np.random.default_rng(5).standard_normal((2, 32, 32, 3)).astype(np.float32)

    x = torch.from_numpy(x_T.transpose(0, 3, 1, 2))
    with torch.no_grad():
        for t in ref_sched.timesteps:
            eps = cifar["torch"](x, t).sample
            # The lab re-derives eps from the clipped x0 (as GLIDE); diffusers on request.
            x = ref_sched.step(eps, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    ref = x.numpy().transpose(0, 2, 3, 1)

    schedule = get_schedule("linear", T).respace(indices)
    model, params = cifar["model"], cifar["params"]

    @jax.jit
    def run(x_T):
        return samplers.sample(
            lambda x, t: model.apply(params, x, t),
            schedule,
            x_T.shape,
            jax.random.PRNGKey(0),
            sampler="ddim",
            clip_x0=1.0,
            x_T=x_T,
        ).samples

    ours = np.asarray(run(jnp.asarray(x_T)))
    assert float(np.max(np.abs(ref - x_T))) > 0.5
    np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=0)


# ---------------------------------------------------------------- refusals


def _write_config(path, **changes):
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config.update(changes)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


@pytest.fixture
def copy_of_cifar(cifar, tmp_path):
    path = tmp_path / "copy"
    shutil.copytree(cifar["path"], path)
    return str(path)


def test_pickle_checkpoint_is_refused_with_the_command(copy_of_cifar):
    weights = os.path.join(copy_of_cifar, "diffusion_pytorch_model.safetensors")
    os.replace(weights, weights[: -len(".safetensors")] + ".bin")
    with pytest.raises(DiffusersFormatError) as e:
        load_unet2d(copy_of_cifar)
    msg = str(e.value)
    assert "diffusion_pytorch_model.bin is a pickle" in msg
    assert "weights_only=True" in msg and "st.save_file(" in msg
    assert "diffusion_pytorch_model.safetensors" in msg


@pytest.mark.parametrize(
    "changes,match",
    [
        (
            dict(
                down_block_types=[
                    "DownBlock2D",
                    "CrossAttnDownBlock2D",
                    "DownBlock2D",
                    "DownBlock2D",
                ]
            ),
            r"unknown down block type 'CrossAttnDownBlock2D'; "
            r"supported: \['AttnDownBlock2D', 'DownBlock2D'\]",
        ),
        (dict(up_block_types=["UpBlock2D"] * 4), r"attention .* at different levels"),
        (dict(resnet_time_scale_shift="scale_shift"), r"resnet_time_scale_shift='scale_shift'"),
        (dict(time_embedding_type="fourier"), r"time_embedding_type='fourier'"),
        (dict(attention_head_dim=24), r"attention_head_dim=24 does not divide"),
        (dict(act_fn="tanh"), r"act_fn='tanh' is not supported"),
        (dict(upcast_attention=True), r"fields \['upcast_attention'\]"),
    ],
)
def test_unrepresentable_config_is_refused_before_reading_weights(copy_of_cifar, changes, match):
    _write_config(copy_of_cifar, **changes)
    # Corrupt weights: a refusal that read them would fail differently.
    with open(os.path.join(copy_of_cifar, "diffusion_pytorch_model.safetensors"), "wb") as f:
        f.write(b"not a safetensors file")
    with pytest.raises(DiffusersFormatError, match=match):
        load_unet2d(copy_of_cifar)


def test_shape_mismatch_names_the_key_and_the_fix(copy_of_cifar):
    _write_config(copy_of_cifar, block_out_channels=[32, 64, 64, 128])
    with pytest.raises(DiffusersFormatError) as e:
        load_unet2d(copy_of_cifar)
    msg = str(e.value)
    assert (
        "down_blocks.3.resnets.0.conv1.weight: file has [64, 64, 3, 3], "
        "config.json gives [128, 64, 3, 3]" in msg
    )
    assert "block_out_channels" in msg and "re-save" in msg


def test_missing_and_unexpected_keys_are_named(copy_of_cifar):
    weights = os.path.join(copy_of_cifar, "diffusion_pytorch_model.safetensors")
    tensors = load_file(weights)
    tensors["extra.weight"] = tensors.pop("conv_out.bias")
    save_file(tensors, weights)
    with pytest.raises(
        DiffusersFormatError,
        match=r"missing keys \['conv_out.bias'\].*unexpected keys \['extra.weight'\]",
    ):
        load_unet2d(copy_of_cifar)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(activation="gelu", outer_activation="silu"), r"model.activation must be one of"),
        (dict(downsample="avgpool"), r"model.downsample must be 'conv'"),
        (dict(time_scale=500.0), r"model.time_scale=500.0 differs from num_train_timesteps=1000"),
        (
            dict(attention_heads=2, channel_mult=(1, 2), attention_resolutions=(16,)),
            r"one attention_head_dim",
        ),
    ],
)
def test_unexportable_lab_unet_is_refused(tmp_path, change, match):
    kw = dict(base_channels=8, channel_mult=(1,), num_res_blocks=1, num_groups=4)
    lab = UNet(**{**kw, **change})
    params = _lab_unet_params(lab, (1, 16, 16, 3))
    with pytest.raises(DiffusersFormatError, match=match):
        export_unet2d(lab, params, str(tmp_path), num_train_timesteps=T, sample_size=16)


def test_google_ddpm_cifar10_32_configs_map_to_the_ddpm_unet():
    """The config.json and scheduler_config.json of google/ddpm-cifar10-32 (as published,
    diffusers 0.0.4 / 0.1.1) describe the lab's DDPM CIFAR-10 U-Net and linear schedule."""
    config = {
        "_class_name": "UNet2DModel",
        "_diffusers_version": "0.0.4",
        "act_fn": "silu",
        "attention_head_dim": None,
        "block_out_channels": [128, 256, 256, 256],
        "center_input_sample": False,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
        "downsample_padding": 0,
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "in_channels": 3,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-06,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": 32,
        "time_embedding_type": "positional",
        "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    }
    kw = unet_config_to_lab(config, T)
    assert (kw["base_channels"], kw["channel_mult"], kw["attention_levels"]) == (
        128,
        (1, 2, 2, 2),
        (1,),
    )
    assert (kw["time_index_offset"], kw["time_freq_shift"], kw["time_flip_sin_to_cos"]) == (
        1.0,
        1.0,
        False,
    )

    def count(model):
        x, t = jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,))
        shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, t))
        return sum(a.size for a in jax.tree.leaves(shapes))

    assert count(UNet(**kw)) == count(ddpm_cifar10_unet())  # 35.7M, Ho et al. App. B
    sched = {
        "_class_name": "DDPMScheduler",
        "_diffusers_version": "0.1.1",
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "beta_start": 0.0001,
        "clip_sample": True,
        "num_train_timesteps": 1000,
        "trained_betas": None,
        "variance_type": "fixed_small",
    }
    assert scheduler_config_to_lab(sched) == dict(
        schedule="linear", num_timesteps=1000, prediction="eps", clip_x0=1.0, variance="beta_tilde"
    )
