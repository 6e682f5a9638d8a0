"""The training app end to end: outputs, resume equality, sample and eval modes, the CLI."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from diffax_lab import checkpointing, config_lib
from diffax_lab.modes import sample, train
from diffax_lab.sharding import make_mesh
from diffax_lab.tasks import registry
from tests.helpers import FASHION_DIR, load_config, run_cli, tiny_config

pytestmark = pytest.mark.slow  # trains diffusion models: `make test-fast` skips it


@pytest.fixture(scope="module")
def fake_data(tiny_data):
    return tiny_data


@pytest.fixture(scope="module")
def uninterrupted(tiny_run):
    """Four steps straight through (shared with other files): the reference for every
    resume test."""
    return tiny_run


def assert_states_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_is_bit_identical(fake_data, uninterrupted, tmp_path):
    ref, ref_dir = uninterrupted
    workdir = str(tmp_path / "run")
    half = train.run(tiny_config(fake_data, **{"train.num_steps": 2}), workdir)
    assert int(half["step"]) == 2
    resumed = train.run(tiny_config(fake_data), workdir)  # num_steps=4: continues from 2
    assert int(resumed["step"]) == 4
    assert_states_equal(jax.device_get(resumed), ref)
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    ref_lines = [json.loads(x) for x in open(os.path.join(ref_dir, "metrics.jsonl"))]
    assert [x["step"] for x in lines] == [2, 4]
    assert lines[-1]["loss"] == ref_lines[-1]["loss"]
    # Nothing left to do: a third run leaves the state as it is.
    again = train.run(tiny_config(fake_data), workdir)
    assert_states_equal(jax.device_get(again), ref)


@pytest.mark.slow  # trains a model end to end: not in `make test-fast`
def test_host_placement_sees_the_same_batches(fake_data, uninterrupted, tmp_path):
    """Same batches, different XLA program (no gather inside): equal up to float rounding.

    Adam turns rounding into differences of ~1e-9 here; other batches would move parameters
    by the size of a whole update (~lr = 1e-4 per step), far outside this tolerance.
    """
    ref, _ = uninterrupted
    state = train.run(tiny_config(fake_data, **{"data.placement": "host"}), str(tmp_path / "h"))
    for x, y in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-7)


def test_ema_and_training_move_parameters(uninterrupted, fake_data):
    ref, _ = uninterrupted
    init = jax.device_get(registry.build(tiny_config(fake_data), make_mesh(1)).create_state())
    moved = [
        float(np.max(np.abs(a - b)))
        for a, b in zip(
            jax.tree.leaves(ref["params"]), jax.tree.leaves(init["params"]), strict=True
        )
    ]
    assert max(moved) > 0
    # EMA lies between the initial and the current parameters (decay 0.999, 4 steps).
    d_ema = sum(
        float(np.sum(np.abs(a - b)))
        for a, b in zip(
            jax.tree.leaves(ref["ema_params"]), jax.tree.leaves(init["params"]), strict=True
        )
    )
    d_par = sum(
        float(np.sum(np.abs(a - b)))
        for a, b in zip(
            jax.tree.leaves(ref["params"]), jax.tree.leaves(init["params"]), strict=True
        )
    )
    assert 0 < d_ema < 0.05 * d_par


def _check_outputs(workdir, steps=(2, 4)):
    config = json.load(open(os.path.join(workdir, "config.json")))
    assert config["model"]["base_channels"] == 16
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [x["step"] for x in lines] == list(steps)
    for x in lines:
        assert {"loss", "grad_norm", "lr", "mse", "images_per_sec"} <= set(x)
        assert np.isfinite(x["loss"]) and x["images_per_sec"] > 0
    for s in steps:
        assert os.path.isdir(os.path.join(workdir, "checkpoints", str(s)))
    with Image.open(os.path.join(workdir, "samples", f"step_{steps[-1]:06d}.png")) as img:
        assert img.size[0] > 64  # 2x2 grid of 32x32 images, scaled 2x


def _check_sample_and_eval(workdir):
    """--mode=sample and --mode=eval from the workdir alone (its config.json), with
    overrides of the sample and eval sections on top."""
    r = run_cli([f"--workdir={workdir}", "--mode=sample", "--config.sample.num_steps=10"])
    assert r.returncode == 0, r.stderr[-3000:]
    npz = np.load(os.path.join(workdir, "samples", "sample_step_000004_ddpm_10.npz"))
    assert npz["images"].shape == (4, 32, 32, 1) and npz["images"].dtype == np.uint8
    for strip in ("forward_strip.png", "reverse_strip.png"):
        assert os.path.getsize(os.path.join(workdir, "samples", strip)) > 0
    r = run_cli([f"--workdir={workdir}", "--mode=eval", "--config.eval.num_examples=32"])
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.load(open(os.path.join(workdir, "eval", "step_000004.json")))
    assert report["num_examples"] == 32 and np.isfinite(report["test_loss"])


def test_cli_on_real_fashion_mnist(tmp_path):
    """The real Debian files (`.ci/run` installs dataset-fashion-mnist)."""
    assert os.path.exists(os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz")), (
        "apt-get install dataset-fashion-mnist (the CI script does this)"
    )
    workdir = str(tmp_path / "real")
    # 64 real images: the shapes of the shared tiny run (tests/conftest.py), so the train
    # step is the program that run compiled (read from the cache, not compiled again).
    r = run_cli(
        ["--config=configs/ddpm.py:tiny", f"--workdir={workdir}", "--config.data.num_examples=64"],
        env_extra={"DIFFAX_DATA_DIR": ""},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Compiling the train step" in r.stderr
    _check_outputs(workdir)
    _check_sample_and_eval(workdir)


def test_class_conditional_cfg_sampling(fake_data, tmp_path):
    """--mode=sample of a class-conditional CFG model (configs/cfg.py): the grid named by w
    and the guidance sweep (rows w, columns labels). Sampling asks nothing of training, so
    the run is an initial state saved as step 4."""
    workdir = str(tmp_path / "cfg")
    config = load_config("cfg.py", "tiny")
    config = config_lib.apply_overrides(
        config, {"data.dir": str(fake_data), "data.num_examples": 0, "sample.num_steps": 10}
    )
    task = registry.build(config, make_mesh(1))
    ckpt = checkpointing.Checkpointer(workdir)
    ckpt.save(4, task.create_state())
    ckpt.close()
    config.sample.guidance_scale = 2.0
    sample.run(config, workdir)
    with Image.open(os.path.join(workdir, "samples", "guidance_sweep.png")) as img:
        # 2 rows (w = 0, 2) by 4 columns (labels 0, 1, 7, 9) of 32x32 tiles, scaled 2x.
        assert img.size[1] == 2 * (2 * 34 + 2) and img.size[0] > 2 * (4 * 34 + 2)
    npz = np.load(os.path.join(workdir, "samples", "sample_step_000004_ddpm_10_w2.npz"))
    assert npz["images"].shape == (4, 32, 32, 1)


def test_cfg_weight_changes_samples_and_zero_weight_is_conditional(fake_data):
    """Guidance reaches the images: w = 2 differs from w = 0, and w = 0 equals the plain
    conditional model (no CFG wrapper) from the same noise."""
    config = tiny_config(
        fake_data,
        **{"model.num_classes": 10, "train.p_uncond": 0.5, "sample.num_steps": 10},
    )
    exp = registry.build(config, make_mesh(1))
    # Random parameters everywhere, so the label and its null token both reach the output.
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda p: jax.numpy.asarray(0.05 * rng.standard_normal(p.shape), p.dtype),
        exp.abstract_state["params"],
    )
    key = jax.random.PRNGKey(0)
    a, _, _ = exp.generate(params, 4, key, labels=(0, 1, 2, 3), guidance_scale=0.0)
    b, _, _ = exp.generate(params, 4, key, labels=(0, 1, 2, 3), guidance_scale=2.0)
    assert float(np.max(np.abs(a - b))) > 1e-3
    config.train.p_uncond = 0.0  # no CFG wrapper: plain conditional sampling
    plain = registry.build(config, make_mesh(1))
    c, _, _ = plain.generate(params, 4, key, labels=(0, 1, 2, 3))
    np.testing.assert_allclose(a, c, atol=1e-4)


def test_extending_by_one_step_saves_it(fake_data, uninterrupted, tmp_path):
    _, ref_dir = uninterrupted
    import shutil

    workdir = tmp_path / "ext"
    shutil.copytree(ref_dir, workdir)
    state = train.run(tiny_config(fake_data, **{"train.num_steps": 5}), str(workdir))
    assert int(state["step"]) == 5
    assert 5 in checkpointing.Checkpointer(str(workdir)).all_steps()
    assert json.loads(open(workdir / "metrics.jsonl").readlines()[-1])["step"] == 5


def test_the_probability_flow_ode_samples_through_the_app(fake_data, uninterrupted):
    """An adaptive sampler (the probability-flow ODE, diffrax) through --mode=sample: no
    step count, no reverse strip, the grid and the .npz as for any sampler."""
    _, workdir = uninterrupted
    config = tiny_config(
        fake_data,
        **{"sample.sampler": "ode", "sample.rtol": 1e-2, "sample.atol": 1e-2, "sample.num": 4},
    )
    out = sample.run(config, str(workdir))
    images = np.load(out["npz"])["images"]
    assert out["npz"].endswith("_ode_adaptive.npz") and images.shape == (4, 32, 32, 1)
    assert images.std() > 0
