"""Pretrained weights in and out through the command line and the config: a random tiny
diffusers pipeline (ddpm-cifar10-32's layout at 1 channel, 8/16 wide, T = 100) is converted
to a lab workdir (python -m diffax_lab.convert, called in-process), sampled with the lab's
sample mode, exported back and compared with the original in diffusers; and a training run
started from it with --config.init.from_diffusers (nothing is downloaded)."""

import json
import os

import jax
import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from flax import traverse_util

from diffax_lab import config_lib, convert
from diffax_lab import workdir as workdir_lib
from diffax_lab.errors import ConfigError, WorkdirError
from diffax_lab.models.diffusers_unet import load_unet2d
from diffax_lab.modes import sample, train
from diffax_lab.modes.common import prepare, restore

T = 100
LAYOUT = dict(
    sample_size=32,
    in_channels=1,
    out_channels=1,
    block_out_channels=(8, 16),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None,
    norm_num_groups=8,
    norm_eps=1e-6,
    flip_sin_to_cos=False,
    freq_shift=1,
    downsample_padding=0,
)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """A DDPMPipeline folder (unet/ + scheduler/) with random weights, T = 100."""
    torch.manual_seed(0)
    unet = UNet2DModel(**LAYOUT).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    # The lab's linear schedule at T = 100: DDPM's endpoints scaled by 1000 / T.
    scheduler = DDPMScheduler(num_train_timesteps=T, beta_start=1e-3, beta_end=0.2)
    path = str(tmp_path_factory.mktemp("pipeline"))
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(path)
    return path, unet


def _torch_out(unet, x_nhwc, steps):
    x = torch.from_numpy(np.asarray(x_nhwc).transpose(0, 3, 1, 2))
    with torch.no_grad():
        out = unet(x, torch.as_tensor(steps)).sample.numpy()
    return out.transpose(0, 2, 3, 1)


def _flat(tree):
    return traverse_util.flatten_dict(jax.device_get(tree))


def _base_overrides(data_dir):
    return {
        "data.dir": str(data_dir),
        "train.batch_size": "8",
        "sample.num": "2",
        "sample.batch_size": "2",
        "sample.sampler": "ddim",
        "sample.num_steps": "3",
        "sample.num_strip": "2",
    }


@pytest.mark.slow
def test_convert_round_trip_and_sample(pipeline_dir, tiny_data, tmp_path):
    path, unet = pipeline_dir
    workdir, out = str(tmp_path / "run"), str(tmp_path / "exported")
    argv = ["--from_diffusers", path, "--workdir", workdir]
    argv += [f"--config.{k}={v}" for k, v in _base_overrides(tiny_data).items()]
    assert convert.main(argv) == 0
    saved = config_lib.load_run_config(workdir)
    # The model and diffusion sections come from the folder's config files.
    assert saved.diffusion.num_timesteps == T and saved.model.time_scale == T
    assert saved.model.base_channels == 8 and tuple(saved.model.channel_mult) == (1, 2)
    assert tuple(saved.model.attention_levels) == (1,) and saved.model.downsample_padding == 0
    assert saved.data.channels == 1 and saved.init.from_diffusers == ""
    with open(os.path.join(workdir, convert.PROVENANCE)) as f:
        assert json.load(f)["from_diffusers"] == os.path.abspath(path)

    # The lab's sample mode accepts the converted workdir; its EMA weights are the folder's.
    result = sample.run(saved, workdir)
    assert result["step"] == 0 and result["samples"].shape == (2, 32, 32, 1)
    _, _, task = prepare(saved, workdir, "sample")
    state, _ = restore(task, workdir)
    _, loaded, _ = load_unet2d(path)
    want, have = _flat(loaded["params"]), _flat(state["ema_params"])
    assert want.keys() == have.keys()
    assert all(np.array_equal(want[k], have[k]) for k in want)

    # Back to diffusers: the exported pipeline computes what the original computes.
    assert convert.main(["--to_diffusers", out, "--workdir", workdir]) == 0
    back = UNet2DModel.from_pretrained(out, subfolder="unet").eval()
    x = np.random.default_rng(0).standard_normal((3, 32, 32, 1)).astype(np.float32)
    steps = [0, 42, T - 1]
    np.testing.assert_allclose(_torch_out(back, x, steps), _torch_out(unet, x, steps), atol=1e-4)
    sched = DDPMScheduler.from_pretrained(out, subfolder="scheduler")
    np.testing.assert_allclose(
        sched.alphas_cumprod.numpy(),
        DDPMScheduler.from_pretrained(path, subfolder="scheduler").alphas_cumprod.numpy(),
        rtol=1e-6,
    )


def test_convert_refusals_name_the_flag(pipeline_dir, tmp_path, capsys):
    path, _ = pipeline_dir
    assert convert.main(["--from_diffusers", str(tmp_path / "nope"), "--workdir", "w"]) == 2
    assert "--from_diffusers=" in capsys.readouterr().err
    argv = ["--from_diffusers", path, "--workdir", str(tmp_path / "w")]
    assert convert.main([*argv, "--config.model.base_channels=32"]) == 2
    err = capsys.readouterr().err
    assert "config.model.base_channels=32" in err and "init.from_diffusers" in err
    assert convert.main(["--to_diffusers", "o", "--workdir", str(tmp_path / "empty")]) == 2
    assert "config.json" in capsys.readouterr().err


def _from_diffusers_config(path, data_dir, **extra):
    config = config_lib.load_config("ddpm")
    overrides = {
        **_base_overrides(data_dir),
        "init.from_diffusers": path,
        "train.num_steps": "1",
        "train.log_every": "1",
        "train.checkpoint_every": "1",
        "train.sample_every": "0",
        "train.progress_bar": "False",
        "optim.warmup_steps": "0",
        "eval.num_examples": "8",
        "eval.batch_size": "8",
        **extra,
    }
    return config_lib.apply_string_overrides(config, overrides)


@pytest.mark.slow
def test_training_starts_from_diffusers_weights(pipeline_dir, tiny_data, tmp_path):
    path, _ = pipeline_dir
    workdir = str(tmp_path / "finetune")
    config = _from_diffusers_config(path, tiny_data)
    _, _, task = prepare(config, workdir, "train")
    assert config.model.time_index_offset == 1.0 and config.diffusion.num_timesteps == T
    task.load_resources(workdir, "train")
    _, loaded, _ = load_unet2d(path)
    want = _flat(loaded["params"])
    state0 = task.create_state()
    for name in ("params", "ema_params"):
        have = _flat(state0[name])
        assert all(np.array_equal(want[k], have[k]) for k in want), name


@pytest.mark.slow  # trains a model end to end: not in `make test-fast`
def test_a_step_from_diffusers_weights_moves_them_a_little(pipeline_dir, tiny_data, tmp_path):
    path, _ = pipeline_dir
    workdir = str(tmp_path / "finetune")
    _, loaded, _ = load_unet2d(path)
    want = _flat(loaded["params"])
    final = jax.device_get(train.run(_from_diffusers_config(path, tiny_data), workdir))
    assert int(final["step"]) == 1
    moved = _flat(final["params"])
    assert any(not np.array_equal(want[k], moved[k]) for k in want)  # it trained a step
    assert max(float(np.max(np.abs(want[k] - moved[k]))) for k in want) < 1e-2
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        assert np.isfinite(json.loads(f.readline())["loss"])


def test_from_diffusers_refusals(pipeline_dir, tiny_data, tmp_path):
    path, _ = pipeline_dir
    config = _from_diffusers_config(str(tmp_path / "missing"), tiny_data)
    with pytest.raises(ConfigError, match="config.init.from_diffusers=.*not a folder"):
        prepare(config, str(tmp_path / "w"), "train")
    config = _from_diffusers_config(path, tiny_data, **{"data.channels": "3"})
    with pytest.raises(ConfigError, match=r"config\.data\.channels=3 differs from 1"):
        prepare(config, str(tmp_path / "w"), "train")


def test_resuming_a_run_saved_before_new_config_fields(tmp_path):
    """Fields added to configs/ddpm.py since a run was saved (the U-Net's diffusers options,
    init) count as their defaults: an older run still resumes; a real change is refused."""
    config = config_lib.load_config("ddpm:tiny")
    saved = json.loads(config.to_json())
    for field in ("time_scale", "norm_eps", "attention_levels", "outer_activation"):
        del saved["model"][field]
    del saved["init"]
    os.makedirs(tmp_path / "checkpoints" / "2")
    (tmp_path / "config.json").write_text(json.dumps(saved))
    workdir_lib.check_resume_compatible(str(tmp_path), config)
    config.model.base_channels = 32
    with pytest.raises(WorkdirError, match="model.base_channels: 16 -> 32"):
        workdir_lib.check_resume_compatible(str(tmp_path), config)
