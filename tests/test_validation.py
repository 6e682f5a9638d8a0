"""Bad input fails before anything compiles, naming the field or path and the fix."""

import pytest

from diffax_lab.data import DataError
from diffax_lab.errors import ConfigError
from diffax_lab.modes import evaluate, sample, train
from diffax_lab.tasks.base import Task
from diffax_lab.tasks.registry import check_config as validate_config
from tests.helpers import load_config, tiny_config, write_fake_idx


@pytest.fixture(autouse=True)
def no_compilation(monkeypatch):
    """Any attempt to build the train step fails the test: errors must come first."""

    def fail(*args, **kwargs):
        raise AssertionError("the train step was built before the bad input was reported")

    monkeypatch.setattr(Task, "make_train_step", fail)


@pytest.mark.parametrize(
    "field,value,pattern",
    [
        ("optim.lr", 0.0, r"config.optim.lr=0.0 is outside the allowed range \(0"),
        ("optim.lr", -1e-4, r"config.optim.lr"),
        ("optim.lr", float("nan"), r"config.optim.lr must be finite"),
        ("optim.grad_clip", -1.0, r"config.optim.grad_clip"),
        (
            "optim.ema_decay",
            1.0,
            r"config.optim.ema_decay=1.0 is outside the allowed range \[0.0, 1.0\)",
        ),
        ("train.p_uncond", 1.0, r"config.train.p_uncond"),
        ("diffusion.num_timesteps", 0, r"config.diffusion.num_timesteps"),
        ("diffusion.num_timesteps", 10, r"config.diffusion.num_timesteps=10 is too few .*21"),
        ("train.batch_size", 0, r"config.train.batch_size"),
        ("diffusion.schedule", "quartic", r"config.diffusion.schedule='quartic' must be one of"),
        ("model.num_groups", 5, r"config.model.num_groups=5 must divide"),
        ("data.image_size", 28, r"config.data.image_size=28 must be a multiple of 8"),
        ("sample.num_steps", 101, r"config.sample.num_steps"),
    ],
)
def test_bad_values_name_their_field(field, value, pattern):
    config = load_config()
    if field == "data.image_size":
        config.model.channel_mult = (1, 2, 2, 2)
        config.model.attention_resolutions = ()
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(ConfigError, match=pattern):
        validate_config(config)


def test_defaults_are_valid():
    for arg in (None, "tiny", "cpu"):
        validate_config(load_config("ddpm.py", arg))
    validate_config(load_config("cifar10_ddpm.py", None))


def test_missing_data_dir_fails_before_compiling(tmp_path):
    config = tiny_config("/no/such/fashion")
    with pytest.raises(DataError, match=r"/no/such/fashion.*apt-get install dataset-fashion-mnist"):
        train.run(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_truncated_idx_fails_before_compiling(tmp_path):
    write_fake_idx(tmp_path / "data", gz=False)
    path = tmp_path / "data" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="train-images-idx3-ubyte is truncated"):
        train.run(tiny_config(tmp_path / "data"), str(tmp_path / "run"))


def test_batch_larger_than_dataset(tmp_path):
    write_fake_idx(tmp_path / "data", n_train=8)
    with pytest.raises(ConfigError, match=r"config.train.batch_size=16 exceeds the 8"):
        train.run(tiny_config(tmp_path / "data"), str(tmp_path / "run"))


@pytest.mark.parametrize("workdir", ["", "/", "  "])
def test_refuses_empty_or_root_workdir(workdir, tmp_path):
    write_fake_idx(tmp_path / "data")
    with pytest.raises(ConfigError, match="workdir"):
        train.run(tiny_config(tmp_path / "data"), workdir)


def test_resume_with_a_different_model_is_refused(tmp_path):
    write_fake_idx(tmp_path / "data")
    run = tmp_path / "run"
    (run / "checkpoints" / "2").mkdir(parents=True)  # it holds a saved step
    (run / "config.json").write_text(tiny_config(tmp_path / "data").to_json())
    saved = (run / "config.json").read_text()
    config = tiny_config(tmp_path / "data", **{"model.base_channels": 32})
    with pytest.raises(ConfigError, match=r"model.base_channels: 16 -> 32.*new --workdir"):
        train.run(config, str(run))
    assert (run / "config.json").read_text() == saved  # nothing saved was overwritten


def test_label_out_of_range_for_class_conditional(tmp_path):
    write_fake_idx(tmp_path / "data")
    config = tiny_config(tmp_path / "data", **{"model.num_classes": 3})
    with pytest.raises(ConfigError, match=r"config.model.num_classes=3 but the data has label"):
        train.run(config, str(tmp_path / "run"))


def test_guidance_needs_a_trained_null_label():
    config = load_config()
    config.sample.guidance_scale = 1.0
    with pytest.raises(ConfigError, match=r"guidance_scale > 0 needs a conditional model trained"):
        validate_config(config)
    config = load_config("cfg.py", "tiny")
    validate_config(config)
    config.sample.labels = (3, 10)
    with pytest.raises(
        ConfigError, match=r"config.sample.labels=\(3, 10\) must be integers in \[0, 10\)"
    ):
        validate_config(config)


def test_classifier_configs_are_valid_and_checked():
    for arg in (None, "clean", "cpu", "cpu,clean", "tiny"):
        validate_config(load_config("classifier.py", arg))
    config = load_config("classifier.py", "tiny")
    config.classifier.noise = "gaussian"
    with pytest.raises(ConfigError, match=r"config.classifier.noise='gaussian' must be one of"):
        validate_config(config)
    config = load_config("classifier.py", "tiny")
    config.model.num_classes = 1
    with pytest.raises(ConfigError, match=r"config.model.num_classes=1 is outside"):
        validate_config(config)
    with pytest.raises(ValueError, match=r"Unknown variant\(s\) \['gpu'\]"):
        load_config("classifier.py", "tiny,gpu")


def test_classifier_guidance_needs_a_classifier_workdir(tmp_path):
    config = load_config()
    config.sample.classifier_scale = 2.0
    with pytest.raises(ConfigError, match=r"needs config.sample.classifier_workdir"):
        validate_config(config)
    config.sample.classifier_workdir = str(tmp_path / "nothing")
    validate_config(config)  # the directory itself is checked when sampling loads it

    write_fake_idx(tmp_path / "data")
    config.data.dir = str(tmp_path / "data")
    with pytest.raises(ConfigError, match=r"config.sample.classifier_workdir=.*no config.json"):
        sample.run(config, str(tmp_path / "run"))


def test_text2img_eval_fields_are_checked(tmp_path):
    for arg in (None, "tiny"):
        validate_config(load_config("text2img.py", arg))
    cases = [
        ("text.class_names", (), r"config.text.class_names must list the dataset's class names"),
        ("text.class_names", ("bag", ""), r"config.text.class_names"),
        ("text.template", "a photo of a", r"config.text.template='a photo of a' must contain"),
        ("text.template", "{} and {}", r"config.text.template='\{\} and \{\}' must contain"),
        ("eval.every_steps", 10, r"config.eval.every_steps must be 0 for a text-conditional"),
    ]
    for field, value, pattern in cases:
        config = load_config("text2img.py", "tiny")
        section, name = field.split(".")
        config[section][name] = value
        with pytest.raises(ConfigError, match=pattern):
            validate_config(config)
    # A CLIP directory that is not there is named with its field, before anything compiles.
    write_fake_idx(tmp_path / "data")
    config = load_config("text2img.py", "tiny")
    config.data.dir = str(tmp_path / "data")
    config.text.clip_dir = str(tmp_path / "no_clip")
    with pytest.raises(ConfigError, match=r"config.text.clip_dir=.*no_clip"):
        evaluate.run(config, str(tmp_path / "run"))
