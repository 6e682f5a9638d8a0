"""Evaluation through the app: sample metrics in a classifier's feature space, bits/dim,
periodic evaluation during training, and the cache of reference features."""

import json
import os

import numpy as np
import pytest
from ml_collections import ConfigDict

from diffax_lab.errors import ConfigError
from diffax_lab.metrics.features import reference_features
from diffax_lab.modes import evaluate, train
from diffax_lab.tasks.registry import check_config as validate_config
from tests.helpers import load_config, tiny_config, write_fake_idx

pytestmark = pytest.mark.slow  # end-to-end: `make test-fast` skips it


class CountingExtractor:
    def __init__(self, name):
        self.name, self.calls = name, 0

    def __call__(self, images):
        self.calls += 1
        return images.reshape(len(images), -1)[:, :4].astype(np.float32)


def test_reference_features_are_cached_and_invalidated(tmp_path):
    data = ConfigDict({"source": "idx", "name": "fashion_mnist"})
    imgs = np.random.default_rng(0).integers(0, 255, (10, 4, 4, 1), dtype=np.uint8)
    ext = CountingExtractor("classifier-a")
    first, hit = reference_features(ext, data, "test", imgs, str(tmp_path))
    again, hit2 = reference_features(ext, data, "test", imgs, str(tmp_path))
    assert (hit, hit2, ext.calls) == (False, True, 1)
    np.testing.assert_array_equal(first, again)
    # Another split, other images, another dataset name or another extractor: recomputed.
    reference_features(ext, data, "train", imgs, str(tmp_path))
    reference_features(ext, data, "test", imgs[:5], str(tmp_path))
    flipped = imgs.copy()
    flipped[0, 0, 0, 0] ^= 1
    reference_features(ext, data, "test", flipped, str(tmp_path))
    reference_features(
        ext, ConfigDict({"source": "idx", "name": "mnist"}), "test", imgs, str(tmp_path)
    )
    assert ext.calls == 5
    other = CountingExtractor("classifier-b")
    _, hit = reference_features(other, data, "test", imgs, str(tmp_path))
    assert not hit and other.calls == 1


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data_dir = write_fake_idx(root / "idx", n_train=64, n_test=32)
    judge = load_config("classifier.py", "tiny,clean")
    judge.data.dir, judge.data.num_examples = str(data_dir), 0
    train.run(judge, str(root / "judge"))
    return data_dir, str(root / "judge"), root


def eval_config(data_dir, judge_dir, **extra):
    return tiny_config(
        data_dir,
        **{
            "eval.judge_workdir": judge_dir,
            "eval.num_samples": 8,
            "eval.num_reference": 16,
            "eval.kid_subset_size": 4,
            "eval.kid_num_subsets": 5,
            "sample.num_steps": 4,
            "sample.batch_size": 4,
            **extra,
        },
    )


def test_periodic_and_final_evaluation_report_their_sample_counts(runs):
    data_dir, judge_dir, root = runs
    workdir = str(root / "ddpm")
    train.run(eval_config(data_dir, judge_dir, **{"eval.every_steps": 4}), workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        lines = [json.loads(x) for x in f]
    periodic = [x for x in lines if "eval_fd" in x]
    assert len(periodic) == 1 and periodic[0]["step"] == 4
    assert periodic[0]["eval_num_generated"] == 8 and periodic[0]["eval_num_real"] == 16

    config = eval_config(
        data_dir, judge_dir, **{"eval.bpd_num_examples": 8, "eval.bpd_num_terms": 5}
    )
    report = evaluate.run(config, workdir)
    assert report["reference_cached"]  # the training-time evaluation computed it
    assert report["num_generated"] == 8 and report["num_real"] == 16
    assert report["feature_space"].startswith("classifier-fashion_mnist-")
    for k in ("fd", "kid", "precision", "recall", "floor_fd", "floor_precision"):
        assert np.isfinite(report[k]), k
    assert report["fd"] >= 0 and 0 <= report["precision"] <= 1 and 0 <= report["recall"] <= 1
    # A 4-step model is far from the data: its samples are farther than real train images.
    assert report["fd"] > report["floor_fd"]
    # Bits/dim: 8 test images, 5 stratified terms of T = 100; an untrained model is poor
    # (more than 1 bit/dim) but finite.
    assert report["bpd_num_examples"] == 8 and report["bpd_terms"] == 5
    assert report["bpd_num_timesteps"] == 100 and 1.0 < report["bpd"] < 100.0
    with open(os.path.join(workdir, "eval", "step_000004.json")) as f:
        assert json.load(f)["fd"] == report["fd"]


def test_eval_settings_are_checked_before_compiling(runs, tmp_path):
    data_dir, judge_dir, _ = runs
    config = tiny_config(data_dir, **{"eval.every_steps": 2})
    with pytest.raises(
        ConfigError,
        match=r"eval.every_steps > 0 computes sample metrics, which need config.eval.judge_workdir",
    ):
        validate_config(config)
    config = eval_config(data_dir, str(tmp_path / "none"))
    with pytest.raises(ConfigError, match=r"config.eval.judge_workdir=.* holds no config.json"):
        evaluate.run(config, str(tmp_path / "run"))
