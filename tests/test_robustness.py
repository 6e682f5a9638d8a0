"""Surviving bad steps: the non-finite guard skips a NaN step and stops a diverged run."""

import json
import os
import shutil
import signal

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from diffax_lab import checkpointing
from diffax_lab.modes import train
from diffax_lab.sharding import make_mesh
from diffax_lab.tasks import registry
from tests.helpers import start_cli, tiny_config, wait_for_metrics
from tests.test_tasks import toy_config


@pytest.fixture(scope="module")
def fake_data(tiny_data):
    return tiny_data


def test_a_nan_step_is_skipped_and_counted(fake_data, tmp_path):
    two = jax.device_get(
        train.run(toy_config(fake_data, **{"train.num_steps": 2}), str(tmp_path / "a"))
    )
    workdir = str(tmp_path / "b")
    config = toy_config(fake_data, **{"train.num_steps": 3, "train.fault_nan_steps": (2,)})
    three = jax.device_get(train.run(config, workdir))
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
    config = toy_config(
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
        train.run(config, workdir)
    ckpt = checkpointing.Checkpointer(workdir)
    assert ckpt.latest_step() == 2  # step 1 trained, step 2 skipped (finite, unchanged)
    exp = registry.build(config, make_mesh(1))
    state = ckpt.restore(ckpt.latest_step(), exp.restore_target)
    ckpt.close()
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state["params"]))


@pytest.fixture(scope="module")
def straight(tiny_run):
    """Four steps with checkpoints at 2 and 4 (tests/conftest.py): the reference for the
    recovery tests (a real network's checkpoint, whose arrays live in the files the tests
    damage)."""
    return tiny_run


def assert_same_state(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def largest_array_file(step_dir):
    files = [
        os.path.join(root, f)
        for root, _, names in os.walk(step_dir)
        for f in names
        if os.sep + "d" + os.sep in os.path.join(root, f) + os.sep or root.endswith(os.sep + "d")
    ]
    return max(files, key=os.path.getsize)


def flip_a_byte(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x10]))


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def drop_metadata(step_dir):
    os.remove(os.path.join(step_dir, "default", "_METADATA"))


@pytest.mark.parametrize("damage", ["bit_flip", "truncated", "no_metadata"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous(straight, tmp_path, capsys, damage):
    """The restore walks back to step 2, which equals the straight run's step 2; the damaged
    step 4 is moved aside, never deleted (what a resumed run does from there is the resume
    test's question)."""
    _, ref_dir = straight
    workdir = str(tmp_path / "run")
    shutil.copytree(ref_dir, workdir)
    step_dir = os.path.join(workdir, "checkpoints", "4")
    if damage == "bit_flip":
        flip_a_byte(largest_array_file(step_dir))
    elif damage == "truncated":
        truncate(largest_array_file(step_dir))
    else:
        drop_metadata(step_dir)
    with open(os.path.join(ref_dir, "config.json")) as f:
        config = ConfigDict(json.load(f))
    target = registry.build(config, make_mesh(1)).restore_target
    ckpt = checkpointing.Checkpointer(workdir)
    state, step = ckpt.restore_latest_good(target)
    ckpt.close()
    assert step == 2 and "checkpoint 4" in capsys.readouterr().out
    assert os.path.isdir(os.path.join(workdir, "checkpoints_corrupt", "4"))  # kept, not deleted
    ref = checkpointing.Checkpointer(ref_dir)
    assert_same_state(ref.restore(2, target), jax.device_get(state))
    ref.close()


@pytest.mark.slow  # trains a model end to end: not in `make test-fast`
def test_sigterm_saves_the_next_step_and_exits_zero(fake_data, tmp_path):
    """SIGTERM (preemption) saves and exits 0 (the first Ctrl-C does the same:
    tests/test_survival.py's second-run test ends its first run with it)."""
    workdir = str(tmp_path / "run")
    args = [
        "--config=configs/ddpm.py:tiny",
        f"--workdir={workdir}",
        f"--config.data.dir={fake_data}",
        "--config.data.num_examples=0",
        "--config.train.num_steps=100000",
        "--config.train.checkpoint_every=100000",
        "--config.train.sample_every=0",
        "--config.train.log_every=1",
    ]
    proc = start_cli(args)
    wait_for_metrics(workdir, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    ckpt = checkpointing.Checkpointer(workdir)
    steps = ckpt.all_steps()
    ckpt.close()
    assert len(steps) == 1 and 0 < steps[0] < 100000
    assert f"Saved step {steps[0]} in" in err and "rerun the same command" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


@pytest.mark.slow
def test_sigkill_during_saves_resumes_from_the_last_complete_one(fake_data, straight, tmp_path):
    """Killed with SIGKILL while saving every step: the restart resumes from whatever
    checkpoint was complete and ends bit-identical to the uninterrupted run."""
    ref, _ = straight
    workdir = str(tmp_path / "run")
    common = [
        "--config=configs/ddpm.py:tiny",
        f"--workdir={workdir}",
        f"--config.data.dir={fake_data}",
        "--config.data.num_examples=0",
        "--config.train.sample_every=0",
        "--config.train.log_every=1",
        "--config.train.checkpoint_every=1",
    ]
    proc = start_cli([*common, "--config.train.num_steps=100000"])
    wait_for_metrics(workdir, proc, min_step=2)
    proc.kill()
    proc.wait(timeout=60)
    # The same run to 4 steps: it resumes (steps beyond 4 are never reached by the ref).
    shutil.rmtree(os.path.join(workdir, "checkpoints_corrupt"), ignore_errors=True)
    ckpt = checkpointing.Checkpointer(workdir)
    resumed_from = ckpt.latest_step()
    ckpt.close()
    if resumed_from is not None and resumed_from > 4:
        pytest.fail(f"the killed run got to step {resumed_from}; the check needs <= 4")
    state = train.run(tiny_config(fake_data, **{"train.checkpoint_every": 1}), workdir)
    assert_same_state(ref, jax.device_get(state))
