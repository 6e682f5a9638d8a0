"""The task interface: a task defined and registered here, in this test module (no file of
diffax_lab knows it), runs through train -> sample -> eval by the modes the command line
runs; the registry refuses unknown names and saved runs of older versions still load.

The same toy task (``toy_config``) serves the tests of the loop that ask nothing of a
network (tests/test_survival.py, tests/test_robustness.py): its step compiles in a second."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax_lab import config_lib, images
from diffax_lab.errors import ConfigError
from diffax_lab.main import MODES
from diffax_lab.sharding import make_mesh
from diffax_lab.tasks import registry
from diffax_lab.tasks.base import Task
from tests.helpers import load_config, tiny_config, write_fake_idx


@registry.register
class MeanImageTask(Task):
    """A toy task: learns the mean training image (one parameter per pixel)."""

    name = "toy_mean_image"
    can_sample = True
    metrics = ("loss",)

    def build(self):
        self.model = None

    def init_params(self, key):
        return {"mean": jnp.zeros(self.image_shape)}

    def train_loss(self, params, x0, labels, keys):
        mse = jnp.mean((x0 - params["mean"]) ** 2)
        return mse, {"mse": mse}

    def sample(self, params, workdir, step, key):
        img = np.asarray(jnp.clip((params["mean"] + 1) * 127.5, 0, 255), np.uint8)
        path = os.path.join(workdir, "samples", f"mean_{step}.png")
        images.save_grid(path, img[None])
        return {"step": step, "grid": path, "mean": img}


def toy_config(data_dir, **overrides):
    """The tiny config run by ``MeanImageTask``: for tests of the loop (checkpoints, resume,
    signals, schedules) rather than of a network; its step compiles in about a second."""
    config = tiny_config(data_dir, **overrides)
    config.task = MeanImageTask.name
    return config


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    data = write_fake_idx(tmp_path_factory.mktemp("idx"), n_train=64, n_test=32)
    config = tiny_config(
        data,
        **{
            "train.num_steps": 30,
            "optim.lr": 0.1,
            "optim.warmup_steps": 1,
            "optim.ema_decay": 0.0,
            "train.checkpoint_every": 30,
            "train.log_every": 10,
        },
    )
    config.task = MeanImageTask.name
    workdir = str(tmp_path_factory.mktemp("toy"))
    state = MODES["train"].run(config, workdir)
    return config, workdir, jax.device_get(state), data


def test_a_task_registered_in_a_test_runs_train_sample_eval(toy_run):
    config, workdir, state, data = toy_run
    assert int(state["step"]) == 30
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [x["step"] for x in lines] == [10, 20, 30]
    assert lines[-1]["loss"] < lines[0]["loss"]  # it learns
    out = MODES["sample"].run(config, workdir)
    assert os.path.exists(out["grid"]) and out["step"] == 30
    report = MODES["eval"].run(config, workdir)
    assert report["step"] == 30 and report["num_examples"] == 32
    # The test loss of the learned mean is close to the test images' own spread about
    # their mean (the best any constant can do), far below an all-zero image's.
    from diffax_lab.data import load_split

    x = load_split(config.data, "test")[0].astype(np.float32) / 127.5 - 1.0
    best = float(np.mean((x - x.mean(0)) ** 2))
    zero = float(np.mean(x**2))
    assert best <= report["test_loss"] < best + 0.25 * (zero - best)


def test_evaluators_are_chosen_by_name_and_checked_per_task(toy_run):
    config, workdir, _, _ = toy_run
    bad = config_lib.apply_overrides(config_lib.load_config("ddpm:tiny"), {})
    bad.task = "toy_mean_image"
    bad.eval.metrics = ("fd",)
    with pytest.raises(ConfigError, match=r"task 'toy_mean_image' supports \['loss'\]"):
        registry.check_config(bad)


def test_unknown_task_is_refused_with_the_closest_name():
    config = config_lib.load_config("ddpm:tiny")
    config.task = "difusion"
    with pytest.raises(ConfigError, match=r"config.task='difusion'.*Did you mean 'diffusion'"):
        registry.check_config(config)


def test_old_saved_configs_name_their_task_and_model():
    """Runs saved before tasks and model names existed still load as what they were."""
    t2i = {"task": "diffusion", "model": {"cond_dim": 16}}
    assert config_lib.migrate(t2i)["task"] == "text2img"
    assert config_lib.migrate(t2i)["model"]["name"] == "unet"
    assert config_lib.migrate({"task": "classifier", "model": {}})["model"]["name"] == "classifier"
    assert config_lib.migrate({"task": "clip", "model": {}})["model"]["name"] == "clip"
    assert config_lib.migrate({"model": {}})["task"] == "diffusion"


def test_model_options_reach_the_network(tmp_path):
    """model.time_index_offset (1 embeds step i as DDPM and diffusers do) is a config option."""
    config = tiny_config(write_fake_idx(tmp_path))
    assert registry.build(config, make_mesh(1)).model.time_index_offset == 0.0  # unchanged
    config.model.time_index_offset = 1.0
    assert registry.build(config, make_mesh(1)).model.time_index_offset == 1.0


def test_sampler_options_come_from_the_sample_section_by_name(tmp_path):
    """A sampler's keyword-only options are read from sample.<option>: a new sampler needs
    no change in any task."""
    config = tiny_config(write_fake_idx(tmp_path))
    task = registry.build(config, make_mesh(1))
    assert task.sampler_kwargs() == {"variance": config.sample.variance}
    config.sample.sampler, config.sample.snr = "pc", 0.2
    assert task.sampler_kwargs() == {
        "predictor": config.sample.predictor,
        "corrector": config.sample.corrector,
        "snr": 0.2,
        "corrector_steps": config.sample.corrector_steps,
    }
    config.sample.sampler = "ode"
    assert set(task.sampler_kwargs()) == {"solver", "rtol", "atol"}
    config.sample.num_steps = 10
    with pytest.raises(ConfigError, match=r"'ode' chooses its own steps"):
        registry.check_config(config)


def test_the_loop_estimates_the_run_after_its_first_steps(tmp_path, caplog):
    """After the first timed steps the loop logs its step time and what the rest takes."""
    caplog.set_level("INFO")
    config = toy_config(write_fake_idx(tmp_path / "d"), **{"train.num_steps": 12})
    MODES["train"].run(config, str(tmp_path / "run"))
    assert re.search(r"s/step: the remaining \d+ steps take about", caplog.text)


@pytest.mark.parametrize(
    "config_name", ["superres.py", "upsampler.py", "vae.py", "classifier.py", "clip.py"]
)
def test_a_task_without_its_own_section_is_refused_naming_it(config_name):
    """Task.section: the task's own config section must exist, checked before the rest."""
    config = load_config(config_name, "tiny")
    task = registry.get(config.task)
    assert task.section and task.section in config
    with config.unlocked():
        del config[task.section]
    with pytest.raises(
        ConfigError, match=rf"config.task='{task.name}' needs a config.{task.section} section"
    ):
        registry.check_config(config)


def test_a_task_name_belongs_to_one_class():
    """registry.register refuses another class under a taken name, naming both; the same
    class defined again (a notebook cell run twice) replaces the old definition."""
    with pytest.raises(
        ValueError, match=r"'toy_mean_image' is taken by tests\.test_tasks\.MeanImageTask"
    ):

        @registry.register
        class Impostor(MeanImageTask):
            pass

    assert registry.get("toy_mean_image") is MeanImageTask
    with pytest.raises(ValueError, match="'diffusion' is taken by diffax_lab.tasks.diffusion"):
        registry.register(type("Mine", (MeanImageTask,), {"name": "diffusion"}))
    again = type("MeanImageTask", (MeanImageTask,), {"__module__": MeanImageTask.__module__})
    try:
        assert registry.register(again) is again
        assert registry.get("toy_mean_image") is again
    finally:
        registry.TASKS["toy_mean_image"] = MeanImageTask
