"""What people do every day never loses work: a second Ctrl-C, a second run on the same
workdir, stale locks, checkpoints of another shape, all checkpoints corrupt, an emptied
checksum file, a full disk, typos, extending a cosine run, sample/eval from the workdir
alone, wall-clock checkpoints, one set of sampler defaults."""

import errno
import json
import os
import re
import shutil
import signal

import numpy as np
import pytest

from diffax_lab import checkpointing, config_lib
from diffax_lab import workdir as workdir_lib
from diffax_lab.diffusion import samplers
from diffax_lab.errors import ConfigError, WorkdirError
from diffax_lab.modes import train
from diffax_lab.sharding import make_mesh
from diffax_lab.tasks import registry
from tests.helpers import (
    run_cli,
    start_cli,
    tiny_config,
    wait_for_metrics,
    write_fake_idx,
)
from tests.test_tasks import toy_config


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory):
    return write_fake_idx(tmp_path_factory.mktemp("idx"), n_train=64, n_test=32)


@pytest.fixture(scope="module")
def toy_four(fake_data, tmp_path_factory):
    """The toy task's run with checkpoints at 2 and 4 (copied by the tests that change it):
    the questions here are of the loop and the checkpoints, not of a network."""
    workdir = str(tmp_path_factory.mktemp("toy_four"))
    train.run(toy_config(fake_data), workdir)
    return workdir


def long_run_args(fake_data, workdir, **extra):
    args = {
        "data.dir": fake_data,
        "data.num_examples": 0,
        "train.num_steps": 100000,
        "train.checkpoint_every": 100000,
        "train.sample_every": 0,
        "train.log_every": 1,
        **extra,
    }
    return ["--config=configs/ddpm.py:tiny", f"--workdir={workdir}"] + [
        f"--config.{k}={v}" for k, v in args.items()
    ]


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


@pytest.mark.slow
def test_a_second_ctrl_c_exits_at_once_without_a_traceback(fake_data, tmp_path):
    workdir = str(tmp_path / "run")
    proc = start_cli(long_run_args(fake_data, workdir))
    wait_for_metrics(workdir, proc)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (0, 130), err[-2000:]  # 0 if the save finished in between
    assert "Traceback" not in err
    target = registry.build(tiny_config(fake_data), make_mesh(1)).restore_target
    ckpt = checkpointing.Checkpointer(workdir)
    for step in ckpt.all_steps():  # whatever is there restores and verifies
        ckpt.restore(step, target)
    ckpt.close()


@pytest.mark.slow
def test_a_second_run_on_a_training_workdir_is_refused_naming_the_first(fake_data, tmp_path):
    workdir = str(tmp_path / "run")
    first = start_cli(long_run_args(fake_data, workdir))
    try:
        wait_for_metrics(workdir, first)
        r = run_cli(long_run_args(fake_data, workdir), timeout=120)
        assert r.returncode == 2, r.stderr[-2000:]
        assert f"is being trained by PID {first.pid}" in r.stderr
        assert "Compiling" not in r.stderr
        # Sample and eval take no lock: they run beside the training (once a step is saved).
    finally:
        first.send_signal(signal.SIGINT)  # Ctrl-C: save the next finished step, exit 0
        _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err[-2000:]
    ckpt = checkpointing.Checkpointer(workdir)
    (saved,) = ckpt.all_steps()
    ckpt.close()
    assert f"Saved step {saved} in" in err and "rerun the same command" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        steps = [json.loads(x)["step"] for x in f]
    assert steps == sorted(set(steps))  # one writer: no step twice


def test_lock_names_its_holder_and_a_stale_one_is_taken_over(tmp_path):
    path = str(tmp_path)
    with open(os.path.join(path, ".lock"), "w") as f:  # left by a process that is gone
        json.dump({"pid": 999999, "host": "elsewhere", "started": 0}, f)
    first = workdir_lib.WorkdirLock(path).acquire()  # the stale lock is taken over
    with open(os.path.join(path, ".lock")) as f:
        assert json.load(f)["pid"] == os.getpid()
    with pytest.raises(WorkdirError, match=rf"being trained by PID {os.getpid()} on host"):
        workdir_lib.WorkdirLock(path).acquire()  # a live holder (another open file)
    first.release()
    workdir_lib.WorkdirLock(path).acquire().release()  # free again


def test_checkpoints_of_another_model_are_refused_not_moved(fake_data, toy_four, tmp_path):
    workdir = copy_run(toy_four, tmp_path / "run")
    os.remove(os.path.join(workdir, "config.json"))  # the guard of the config is gone too
    config = toy_config(fake_data, **{"data.image_size": 16, "train.num_steps": 6})
    with pytest.raises(checkpointing.IncompatibleCheckpointError, match=r"another shape"):
        train.run(config, workdir)
    assert not os.path.exists(os.path.join(workdir, "checkpoints_corrupt"))
    ckpt = checkpointing.Checkpointer(workdir)
    assert ckpt.all_steps() == [2, 4]
    ckpt.close()


def _corrupt(workdir, step):
    step_dir = os.path.join(workdir, "checkpoints", str(step))
    files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs]
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.seek(os.path.getsize(biggest) // 2)
        f.write(b"\xff" * 64)


def test_all_checkpoints_corrupt_refuses_unless_told(fake_data, toy_four, tmp_path):
    workdir = copy_run(toy_four, tmp_path / "run")
    digest_dir = os.path.join(workdir, "checkpoint_digests")
    for step in (2, 4):  # flip bytes, or (if orbax reads it anyway) a digest of other bytes
        _corrupt(workdir, step)
        with open(os.path.join(digest_dir, f"{step}.json"), "w") as f:
            json.dump({"['params']": "0" * 64}, f)
    config = toy_config(fake_data, **{"train.num_steps": 6})
    with pytest.raises(checkpointing.AllCorruptError, match=r"restart_if_corrupt=True"):
        train.run(config, workdir)
    aside = sorted(os.listdir(os.path.join(workdir, "checkpoints_corrupt")))
    assert aside == ["2", "2.digest.json", "4", "4.digest.json"]  # kept, never deleted
    config.train.restart_if_corrupt = True
    state = train.run(config, workdir)
    assert int(state["step"]) == 6


def test_an_empty_checksum_file_restores_unverified(fake_data, toy_four, tmp_path):
    workdir = copy_run(toy_four, tmp_path / "run")
    open(os.path.join(workdir, "checkpoint_digests", "4.json"), "w").close()
    state = train.run(toy_config(fake_data, **{"train.num_steps": 5}), workdir)
    assert int(state["step"]) == 5  # resumed from 4 (not moved aside, no crash)
    assert not os.path.exists(os.path.join(workdir, "checkpoints_corrupt"))


def test_a_full_disk_is_one_clear_error_and_keeps_earlier_checkpoints(
    fake_data, toy_four, tmp_path, monkeypatch
):
    workdir = copy_run(toy_four, tmp_path / "run")
    save = checkpointing.Checkpointer.save

    def full(self, step, state):
        if step > 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(self, step, state)

    monkeypatch.setattr(checkpointing.Checkpointer, "save", full)
    config = toy_config(fake_data, **{"train.num_steps": 6, "train.checkpoint_every": 1})
    with pytest.raises(WorkdirError, match=r"No space left.*steps \[2, 4\]\) are intact"):
        train.run(config, workdir)
    monkeypatch.undo()
    ckpt = checkpointing.Checkpointer(workdir)
    assert ckpt.all_steps() == [2, 4]
    ckpt.close()
    assert all(
        os.path.getsize(os.path.join(workdir, "checkpoint_digests", f"{s}.json")) > 0
        for s in (2, 4)
    )


@pytest.mark.slow
def test_user_mistakes_are_one_line_with_exit_2(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    cases = [
        (["--config=configs/ddpm.py:tiny", "--config.train.stepz=5"], r"Did you mean 'num_steps'"),
        (["--config=configs/ddmp.py:tiny"], r"No config file 'configs/ddmp.py'"),
        (["--config=configs/ddpm.py:tiny", "--config.optim.lr=fast"], r"--config.optim.lr=fast"),
        (["--config=configs/ddpm.py:tiny", "--config.optim.lr=0"], r"optim.lr=0.0 is outside"),
    ]
    for args, pattern in cases:
        r = run_cli([*args, f"--workdir={tmp_path}/w"], timeout=120)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
        assert re.search(pattern, lines[0]), lines[0]
    assert not os.path.exists(f"{tmp_path}/w")
    r = run_cli(["--config=configs/ddpm.py:tiny", f"--workdir={not_a_dir}/sub"], timeout=120)
    assert r.returncode == 2 and "is not writable" in r.stderr.splitlines()[-1], r.stderr


@pytest.mark.slow
def test_sample_and_eval_of_a_workdir_without_a_run_create_nothing(tmp_path):
    """(Sampling and evaluating from the workdir alone: tests/test_train.py's CLI run.)"""
    empty = tmp_path / "empty"
    for mode in ("sample", "eval"):
        r = run_cli([f"--workdir={empty}", f"--mode={mode}"], timeout=120)
        assert r.returncode == 2 and "holds no config.json" in r.stderr, r.stderr[-2000:]
    assert not empty.exists()  # nothing created


def test_a_workdir_without_checkpoints_takes_another_model(fake_data, tmp_path):
    """num_steps=0 leaves no checkpoint: the next run with another model is not refused."""
    workdir = str(tmp_path / "run")
    train.run(toy_config(fake_data, **{"train.num_steps": 0}), workdir)
    assert os.path.exists(os.path.join(workdir, "config.json"))
    config = toy_config(fake_data, **{"train.num_steps": 1, "data.image_size": 16})
    assert int(train.run(config, workdir)["step"]) == 1


def test_extending_a_cosine_run_keeps_its_decay_horizon(fake_data, tmp_path):
    workdir = str(tmp_path / "run")
    cos = {"optim.lr_schedule": "cosine", "optim.warmup_steps": 0, "train.log_every": 1}
    train.run(toy_config(fake_data, **{**cos, "train.num_steps": 4}), workdir)
    train.run(toy_config(fake_data, **{**cos, "train.num_steps": 6}), workdir)
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["optim"]["decay_steps"] == 4
    lrs = {json.loads(x)["step"]: json.loads(x)["lr"] for x in open(f"{workdir}/metrics.jsonl")}
    # The lr logged at step s is the schedule at step s - 1; cosine over 4 steps ends at 0.
    assert lrs[4] > 0 and lrs[5] == pytest.approx(0.0, abs=1e-9) and lrs[6] == lrs[5]


def test_checkpoints_also_follow_the_wall_clock(fake_data, tmp_path, monkeypatch):
    """train.checkpoint_every_secs saves whenever that much time passed since the last save
    (a clock that jumps 1000 s per reading stands in for a slow CPU)."""
    clock = iter(range(0, 10**9, 1000))
    monkeypatch.setattr(train, "wall_clock", lambda: float(next(clock)))
    workdir = str(tmp_path / "run")
    config = toy_config(
        fake_data,
        **{"train.num_steps": 3, "train.checkpoint_every": 100, "train.keep_checkpoints": 5},
    )
    config.train.checkpoint_every_secs = 600
    train.run(config, workdir)
    ckpt = checkpointing.Checkpointer(workdir)
    assert ckpt.all_steps() == [1, 2, 3]
    ckpt.close()


def test_the_library_and_the_command_line_share_sampler_defaults():
    s = config_lib.load_config("ddpm").sample
    for field, value in samplers.DEFAULTS.items():
        assert s[field] == value, field
    assert samplers.sample.__kwdefaults__["clip_x0"] == samplers.DEFAULTS["clip_x0"]
    assert samplers.sample.__kwdefaults__["sampler"] == samplers.DEFAULTS["sampler"]


def test_overrides_are_typed_and_unknown_fields_refused():
    config = config_lib.load_config("ddpm:tiny")
    config_lib.apply_string_overrides(config, {"optim.lr": "1", "sample.labels": "(1, 2)"})
    assert config.optim.lr == 1.0 and config.sample.labels == (1, 2)
    with pytest.raises(ConfigError, match=r"Did you mean 'num_steps'"):
        config_lib.apply_string_overrides(config, {"train.stepz": "5"})
    with pytest.raises(ConfigError, match=r"True or False"):
        config_lib.apply_string_overrides(config, {"train.progress_bar": "maybe"})
    np.testing.assert_equal(config.train.num_steps, 4)
