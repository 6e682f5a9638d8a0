"""Super-resolution diffusion with conditioning augmentation, the regression upsampler,
SSIM/PSNR, and cascaded sampling (tasks/superres.py, upsampler.py, cascade.py)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax_lab import checkpointing, config_lib, sharding
from diffax_lab import workdir as workdir_lib
from diffax_lab.data import pipeline
from diffax_lab.data.idx import write_idx
from diffax_lab.diffusion import conditioning
from diffax_lab.errors import ConfigError
from diffax_lab.metrics.image_quality import gaussian_window, psnr, ssim
from diffax_lab.modes import evaluate as evaluate_mode
from diffax_lab.modes import sample as sample_mode
from diffax_lab.modes import train as train_mode
from diffax_lab.tasks import registry
from diffax_lab.tasks.superres import pack, unpack


def small(name, data_dir, **overrides):
    config = config_lib.load_config(f"{name}.py:tiny")
    config.data.dir = str(data_dir)
    config.data.num_examples = 0
    return config_lib.apply_overrides(config, overrides)


def random_weight_run(config, workdir, seed=1, scale=0.05):
    """A run directory holding a step-0 checkpoint of random (non-zero) weights: sampling
    paths without the cost of compiling a train step."""
    cls = registry.check_config(config)
    task = cls(config, sharding.make_mesh(1))
    state = jax.device_get(task.create_state())
    leaves, tree = jax.tree.flatten(state["params"])
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    noisy = [p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
    state["params"] = state["ema_params"] = jax.tree.unflatten(tree, noisy)
    os.makedirs(workdir, exist_ok=True)
    workdir_lib.write_config(str(workdir), config)
    ckpt = checkpointing.Checkpointer(str(workdir))
    ckpt.save(0, state)
    ckpt.wait()
    ckpt.close()
    return str(workdir)


# ----- conditioning augmentation -----
def test_augmentation_level_zero_is_the_image_and_one_is_noise():
    x = jax.random.uniform(jax.random.PRNGKey(0), (3, 4, 4, 1), minval=-1, maxval=1)
    key = jax.random.PRNGKey(1)
    np.testing.assert_array_equal(conditioning.augment(x, 0.0, key), x)
    noise = jax.random.normal(key, x.shape)
    np.testing.assert_allclose(conditioning.augment(x, 1.0, key), noise, atol=1e-6)
    mixed = conditioning.augment(x, jnp.array([0.0, 0.5, 1.0]), key)
    np.testing.assert_array_equal(mixed[0], x[0])
    np.testing.assert_allclose(mixed[1], np.sqrt(0.5) * (x[1] + noise[1]), atol=1e-6)
    low, level = unpack(pack(x, jnp.array([0.0, 0.25, 1.0])))
    np.testing.assert_array_equal(low, x)
    np.testing.assert_array_equal(level, [0.0, 0.25, 1.0])


def test_area_downsample_is_the_block_mean():
    x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    np.testing.assert_array_equal(
        conditioning.area_downsample(x, 2)[0, ..., 0], [[2.5, 4.5], [10.5, 12.5]]
    )


@pytest.fixture(scope="module")
def sr_task(tiny_data):
    config = small("superres", tiny_data, **{"train.p_uncond": 0.2})
    cls = registry.check_config(config)
    task = cls(config, sharding.make_mesh(1))
    params = task.init_params(jax.random.PRNGKey(0))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
    params = jax.tree.unflatten(
        tree, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
    )
    return task, params


def test_superres_level_and_low_res_reach_the_network(sr_task):
    task, params = sr_task
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (2, 16, 16, 1))
    t = jnp.full((2,), 0.5)
    x_lr = task.low_res(x)
    assert x_lr.shape == (2, 8, 8, 1)

    def out(low, level):
        return task.model_fn(params, pack(low, jnp.full((2,), level)))(x, t)

    base = out(x_lr, 0.0)
    assert base.shape == x.shape  # out_channels = C though C more channels go in
    assert not np.allclose(base, out(x_lr, 0.3), atol=1e-4)  # the level is a condition
    assert not np.allclose(base, out(-x_lr, 0.0), atol=1e-4)  # so is the image
    # The training condition: level 0 at aug_max = 0 passes the image through unchanged.
    task.config.superres.aug_max = 0.0
    try:
        u8 = np.asarray((x + 1) * 100, np.uint8)
        x0, cond = task.model_input(jnp.asarray(u8), None, key)
        low, level = unpack(cond)
        np.testing.assert_array_equal(low, task.low_res(x0))
        np.testing.assert_array_equal(level, 0.0)
    finally:
        task.config.superres.aug_max = 0.5


def test_superres_cfg_weight_zero_is_the_conditional_model(sr_task):
    task, params = sr_task
    x = jax.random.normal(jax.random.PRNGKey(5), (2, 16, 16, 1))
    t = jnp.full((2,), 0.3)
    cond = pack(task.low_res(x), jnp.full((2,), 0.1))
    plain = task.model_fn(params, cond)(x, t)
    np.testing.assert_allclose(task.guided_model_fn(params, cond, 0.0)(x, t), plain, atol=1e-5)
    assert not np.allclose(task.guided_model_fn(params, cond, 2.0)(x, t), plain, atol=1e-4)


# ----- SSIM / PSNR -----
def test_ssim_and_psnr_closed_forms():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, 16, 16, 1)).astype(np.uint8)
    np.testing.assert_allclose(ssim(x, x), 1.0, atol=1e-12)
    assert np.all(np.isinf(psnr(x, x)))
    # Constant images a and b: only the luminance term, (2ab + C1) / (a^2 + b^2 + C1).
    a, b = np.full((1, 12, 12, 1), 100.0), np.full((1, 12, 12, 1), 140.0)
    c1 = (0.01 * 255) ** 2
    np.testing.assert_allclose(ssim(a, b), (2 * 100 * 140 + c1) / (100**2 + 140**2 + c1))
    np.testing.assert_allclose(psnr(a, b), 10 * np.log10(255**2 / 40**2))
    # One window position (11x11): with weights w, mu_x = 128 + m, mu_y = 128 + k m,
    # sigma_y^2 = k^2 sigma_x^2, sigma_xy = k sigma_x^2 for y = 128 + k z, x = 128 + z.
    z = rng.normal(0, 20, (11, 11))
    w = np.outer(gaussian_window(), gaussian_window())
    k, c2 = 0.5, (0.03 * 255) ** 2
    m = np.sum(w * z)
    v = np.sum(w * z * z) - m * m
    mx, my = 128 + m, 128 + k * m
    want = ((2 * mx * my + c1) * (2 * k * v + c2)) / ((mx**2 + my**2 + c1) * ((1 + k * k) * v + c2))
    got = ssim((128 + z)[None, :, :, None], (128 + k * z)[None, :, :, None])
    np.testing.assert_allclose(got, want, rtol=1e-10)


# ----- the trained models -----
def write_one_image_idx(directory, n=16):
    """n copies of one 28x28 image (a bar and a gradient), as train and test splits."""
    os.makedirs(directory, exist_ok=True)
    img = np.zeros((28, 28), np.uint8)
    img[6:22, 10:18] = 220
    img[:, :4] = np.linspace(0, 255, 28).astype(np.uint8)[:, None]
    for prefix in ("train", "t10k"):
        write_idx(
            os.path.join(directory, f"{prefix}-images-idx3-ubyte"), np.repeat(img[None], n, 0)
        )
        write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte"), np.zeros(n, np.uint8))
    return str(directory)


@pytest.mark.slow
def test_superres_trained_on_one_image_keeps_its_low_res_content(tmp_path):
    data = write_one_image_idx(tmp_path / "one")
    config = small(
        "superres",
        data,
        **{
            "train.num_steps": 80,
            "train.checkpoint_every": 80,
            "optim.lr": 3e-3,
            "optim.ema_decay": 0.9,
            "diffusion.prediction": "x0",
            "sample.num_steps": 10,
            "superres.aug_max": 0.2,
        },
    )
    train_mode.run(config, str(tmp_path / "sr"))
    out = sample_mode.run(config, str(tmp_path / "sr"))
    up = out["samples"].astype(np.float32)
    assert up.shape == (4, 16, 16, 1)  # the high resolution
    real = np.asarray(config_lib.load_config("superres.py:tiny").data.image_size)
    assert real == 16
    from diffax_lab.data import load_split

    hi = load_split(config.data, "test")[0][:4].astype(np.float32)
    lo_err = np.abs(
        np.asarray(conditioning.area_downsample(up, 2))
        - np.asarray(conditioning.area_downsample(hi, 2))
    ).mean()
    # Within 10 grey levels on average of the input's downsampled content (the image's
    # own spread is ~90 levels; an untrained model is as far off as that).
    assert lo_err < 10, lo_err
    assert os.path.exists(out["rows"])


def test_upsampler_refuses_bad_config(tiny_data):
    config = small("upsampler", tiny_data, **{"upsampler.factor": 3})
    with pytest.raises(ConfigError, match="power of 2"):
        registry.check_config(config)
    config = small("superres", tiny_data, **{"superres.factor": 3})
    with pytest.raises(ConfigError, match="multiple of config.superres.factor"):
        registry.check_config(config)


# ----- the cascade -----
@pytest.fixture(scope="module")
def cascade_runs(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("cascade")
    base = small(
        "ddpm",
        tiny_data,
        **{
            "data.image_size": 8,
            "model.channel_mult": (1,),
            "model.base_channels": 8,
            "model.num_groups": 4,
            "model.attention_resolutions": (),
            "train.sample_every": 0,
        },
    )
    sr = small("superres", tiny_data)
    up = small("upsampler", tiny_data, **{"data.image_size": 32})
    return {
        "base": random_weight_run(base, root / "base"),
        "sr": random_weight_run(sr, root / "sr"),
        "up": random_weight_run(up, root / "up"),
        "root": root,
    }


def cascade_config(runs, tiny_data, **overrides):
    config = small("cascade", tiny_data, **{"data.image_size": 32})
    config.cascade.base_workdir = runs["base"]
    config.cascade.upsampler_workdirs = (runs["sr"], runs["up"])
    return config_lib.apply_overrides(config, overrides)


@pytest.mark.slow  # trains a model end to end: not in `make test-fast`
def test_cascade_runs_every_stage_deterministically(cascade_runs, tiny_data):
    runs = cascade_runs
    workdir = str(runs["root"] / "c1")
    config = cascade_config(runs, tiny_data, **{"cascade.aug_levels": (0.2,)})
    first = sample_mode.run(config, workdir)
    assert [s.shape[1] for s in first["stages"]] == [8, 16, 32]
    assert os.path.exists(first["stages_grid"])
    # The same seed again, from the workdir's own config.json (as with --config left out).
    saved = config_lib.load_run_config(workdir)
    task = registry.check_config(saved)(saved, sharding.make_mesh(1))
    task.load_resources(workdir, "sample")
    key = jax.random.PRNGKey(saved.sample.seed)
    again, _ = task.run_stages(4, key)
    for a, b in zip(first["stages"], again, strict=True):
        np.testing.assert_array_equal(a, np.asarray(pipeline.to_uint8(b)))
    # The super-resolution stage sees its input: the same key on another base draw differs.
    other, _ = task.run_stages(4, jax.random.PRNGKey(1))
    sr, params, _ = task.stages[1]
    k = jax.random.fold_in(key, 1)
    np.testing.assert_array_equal(sr.upsample(params, again[0], k), again[1])
    assert not np.allclose(sr.upsample(params, other[0], k), again[1], atol=1e-3)


@pytest.mark.slow  # trains a model end to end: not in `make test-fast`
def test_cascade_with_other_samplers(cascade_runs, tiny_data):
    """Per-stage samplers: a discrete-grid one for the base, a Karras-grid one for the
    super-resolution stage (every sampler goes through the same model_fn hooks)."""
    runs = cascade_runs
    config = cascade_config(runs, tiny_data, **{"cascade.samplers": ("dpm_solver++", "euler")})
    out = sample_mode.run(config, str(runs["root"] / "c_other"))
    assert out["samples"].shape == (4, 32, 32, 1)
    assert np.isfinite(out["samples"].astype(float)).all() and out["samples"].std() > 0


def test_cascade_refuses_training_and_mismatched_stages(cascade_runs, tiny_data):
    runs = cascade_runs
    config = cascade_config(runs, tiny_data)
    with pytest.raises(ConfigError, match="trains nothing"):
        train_mode.run(config, str(runs["root"] / "t"))
    bad = cascade_config(runs, tiny_data)
    bad.cascade.upsampler_workdirs = (runs["up"],)  # 8 px base into a 16 -> 32 upsampler
    with pytest.raises(ConfigError, match="takes"):
        sample_mode.run(bad, str(runs["root"] / "bad"))


@pytest.mark.slow
def test_unclip_cascade_text_prior_decoder(tiny_data, tmp_path):
    """text -> prior -> text2img decoder through the cascade (random weights), scored by
    the clip_score evaluator as --mode=eval does."""
    clip_cfg = config_lib.load_config("clip.py:tiny")
    clip_task = registry.build(clip_cfg, sharding.make_mesh(1))
    clip_dir = clip_task.export(clip_task.init_params(jax.random.PRNGKey(0)), str(tmp_path))
    t2i = small("text2img", tiny_data, **{"text.clip_dir": clip_dir})
    prior = small("prior", tiny_data, **{"text.clip_dir": clip_dir})
    runs = {
        "t2i": random_weight_run(t2i, tmp_path / "t2i"),
        "prior": random_weight_run(prior, tmp_path / "prior"),
    }
    config = small("cascade", tiny_data, **{"data.image_size": 28})
    k = config.cascade
    k.base_workdir, k.prior_workdir, k.upsampler_workdirs = runs["t2i"], runs["prior"], ()
    k.samplers, k.steps, k.guidance, k.aug_levels = ("ddim",), (2,), (1.0,), ()
    k.prompts, k.prior_steps = ("a photo of a bag", "a photo of a sneaker"), 2
    unclip = config_lib.load_config("cascade.py:unclip")
    config.text, config.eval.metrics = unclip.text, ("clip_score",)
    # --mode=eval draws from the class prompts through prior and decoder, CLIP-scores them.
    report = evaluate_mode.run(config, str(tmp_path / "c"))
    assert report["prior"] and report["num_generated"] == config.eval.num_samples
    assert 0.0 <= report["clip_score"] <= 100.0 and "clip_score_shuffled" in report
