"""Surviving bad steps: the non-finite guard skips a NaN step and stops a diverged run."""

import json
import os

import jax
import numpy as np
import pytest

from diffax_lab import checkpointing, train
from diffax_lab.experiment import Experiment
from diffax_lab.sharding import make_mesh
from tests.helpers import tiny_config, write_fake_idx


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory):
    return write_fake_idx(tmp_path_factory.mktemp("idx"), n_train=64, n_test=32)


def test_a_nan_step_is_skipped_and_counted(fake_data, tmp_path):
    two = jax.device_get(
        train.train(tiny_config(fake_data, **{"train.num_steps": 2}), str(tmp_path / "a"))
    )
    workdir = str(tmp_path / "b")
    config = tiny_config(fake_data, **{"train.num_steps": 3, "train.fault_nan_steps": (2,)})
    three = jax.device_get(train.train(config, workdir))
    assert int(three["step"]) == 3
    for name in ("params", "ema_params", "opt_state"):  # the NaN step changed nothing
        for x, y in zip(jax.tree.leaves(two[name]), jax.tree.leaves(three[name]), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        lines = [json.loads(x) for x in f]
    assert lines[-1]["step"] == 3 and lines[-1]["skipped_total"] == 1.0
    assert all(np.isfinite(v) for ln in lines for v in ln.values())


def test_persistent_nan_stops_the_run_without_a_bad_checkpoint(fake_data, tmp_path):
    workdir = str(tmp_path / "run")
    config = tiny_config(
        fake_data,
        **{
            "train.num_steps": 6,
            "train.fault_nan_steps": (1, 2, 3, 4, 5),
            "train.max_consecutive_skips": 2,
            "train.checkpoint_every": 1,
            "train.log_every": 1,
        },
    )
    with pytest.raises(train.NonFiniteError, match=r"2 consecutive non-finite steps up to step 3"):
        train.train(config, workdir)
    ckpt = checkpointing.Checkpointer(workdir)
    assert ckpt.latest_step() == 2  # step 1 trained, step 2 skipped (finite, unchanged)
    exp = Experiment(config, make_mesh(1))
    state = ckpt.restore(ckpt.latest_step(), exp.restore_target)
    ckpt.close()
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state["params"]))
