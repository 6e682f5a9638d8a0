"""FID and KID in Inception space as evaluators (``fid_inception``, ``kid_inception``) on the
shared tiny run, with a random-weight Inception-v3 saved by the test in the converted
(safetensors, torch layout) format: the numbers equal the formulas on the same features,
n is stated, the reference features are cached beside the weights, a pytorch-fid .npz is
read, and a missing weights file is refused before anything compiles."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import save_file

from diffax_lab import config_lib
from diffax_lab.errors import ConfigError
from diffax_lab.metrics import fid as fid_lib
from diffax_lab.models.inception import INPUT_SIZE, InceptionV3FID
from diffax_lab.modes import evaluate
from diffax_lab.modes.common import build_evaluators, prepare
from tests.helpers import tiny_config

N = 2  # samples and reference images: Inception at 299 px is the cost on a CPU

TORCH_LEAF = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def write_random_inception(path, seed=0):
    """Random pytorch-fid-layout weights (He-scaled convolutions, unit batch norms)."""
    shapes = jax.eval_shape(
        lambda: InceptionV3FID(resize_input=False).init(
            jax.random.PRNGKey(0), np.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), np.float32)
        )
    )
    rng = np.random.default_rng(seed)
    arrays = {}
    for (col, *mods, leaf), s in traverse_util.flatten_dict(shapes).items():
        shape = s.shape
        if leaf == "kernel":  # [kh, kw, in, out] -> torch [out, in, kh, kw]
            fan_in = shape[0] * shape[1] * shape[2]
            a = rng.standard_normal((shape[3], shape[2], shape[0], shape[1])) * np.sqrt(2 / fan_in)
        elif leaf in ("scale", "var"):
            a = 1.0 + 0.1 * rng.random(shape)
        else:
            a = 0.1 * rng.standard_normal(shape)
        arrays[".".join(mods + [TORCH_LEAF[(col, leaf)]])] = a.astype(np.float32)
    save_file(arrays, path, metadata={"source_sha256": "test"})
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return write_random_inception(str(tmp_path_factory.mktemp("inception") / "w.safetensors"))


def _config(base, weights, **extra):
    """``base``: the shared tiny run (its saved config) or a config to start from."""
    config = config_lib.load_run_config(base[1]) if isinstance(base, tuple) else base
    overrides = {
        "eval.metrics": ("fid_inception", "kid_inception"),
        "eval.inception_weights": weights,
        "eval.num_samples": N,
        "eval.num_reference": N,
        "eval.kid_subset_size": N,
        "eval.kid_num_subsets": 3,
        "eval.pr_k": 1,
        "eval.inception_batch_size": N,
        "sample.batch_size": N,
        "sample.sampler": "ddim",
        "sample.num_steps": 2,
        **extra,
    }
    return config_lib.apply_overrides(config, overrides)


@pytest.mark.slow
def test_fid_and_kid_in_inception_space(tiny_run, weights, tmp_path, caplog):
    workdir = str(tmp_path / "run")
    shutil.copytree(tiny_run[1], workdir)
    config = _config(tiny_run, weights)
    with caplog.at_level("WARNING"):
        report = evaluate.run(config, workdir)
    assert report["num_samples"] == N and f"n={N} samples" in report["fid_line"]
    assert report["fid_comparable"] is False  # random weights, and n < 10,000
    assert any(f"n={N} < 10000" in r.getMessage() for r in caplog.records)
    assert report["fid_inception"] > 0 and np.isfinite(report["kid_inception"])
    # The train split's features are cached beside the weights, for the next run.
    cache = os.path.join(os.path.dirname(weights), "inception_cache")
    (entry,) = os.listdir(cache)
    with np.load(os.path.join(cache, entry)) as f:
        real = f["features"]
        assert json.loads(str(f["key"]))["num_images"] == N and real.shape == (N, 2048)

    # A pytorch-fid .npz of those statistics gives the same FID (same samples, same seed).
    stats = str(tmp_path / "stats.npz")
    fid_lib.save_reference_statistics(stats, *fid_lib.fid_statistics(real))
    config = _config(tiny_run, weights, **{"eval.fid_reference_stats": stats})
    config.eval.metrics = ("fid_inception",)
    again = evaluate.run(config, workdir)
    np.testing.assert_allclose(again["fid_inception"], report["fid_inception"], rtol=1e-6)
    assert again["fid_reference"] == f"statistics {stats}"
    with open(os.path.join(workdir, "eval", "step_000004.json")) as f:
        assert json.load(f)["fid_inception"] == again["fid_inception"]


def test_missing_weights_are_refused_with_the_command(tiny_data, tmp_path):
    workdir = str(tmp_path / "run")  # nothing is trained: the refusal comes first
    for path, match in (("", "is empty"), (str(tmp_path / "none.safetensors"), "does not exist")):
        config = _config(tiny_config(tiny_data), path)
        _, mesh, task = prepare(config, workdir, "eval")
        with pytest.raises(ConfigError, match=f"config.eval.inception_weights.*{match}") as e:
            build_evaluators(task, workdir, mesh, task.selected_metrics())
        assert "python -m diffax_lab.models.inception --convert" in str(e.value)
    pickle_path = tmp_path / "pt_inception.pth"
    pickle_path.write_bytes(b"not read")
    config = _config(tiny_config(tiny_data), str(pickle_path))
    _, mesh, task = prepare(config, workdir, "eval")
    with pytest.raises(ConfigError, match="pickle.*--convert"):
        build_evaluators(task, workdir, mesh, task.selected_metrics())
