"""The notebook API (diffax_lab/api.py) and sweeps (diffax_lab/sweep.py)."""

import json
import os

import numpy as np
import pytest

from diffax_lab import api, sweep
from diffax_lab.errors import ConfigError
from tests.helpers import SMALL_UNET, tiny_config


def test_config_typed_overrides_on_a_copy_and_unknown_fields_refused():
    cfg = api.config("ddpm:tiny", **{"train.num_steps": "7", "model.attention_resolutions": "()"})
    assert cfg.train.num_steps == 7 and cfg.model.attention_resolutions == ()
    other = api.config(cfg, **{"model.activation": "gelu", "optim.lr": 1})
    assert other.model.activation == "gelu" and isinstance(other.optim.lr, float)
    assert cfg.model.activation == "silu"  # the config handed in is not changed
    with pytest.raises(ConfigError, match="Did you mean 'num_steps'"):
        api.config("ddpm:tiny", **{"train.num_step": 3})
    with pytest.raises(ConfigError, match="train.progress_bar"):
        api.config("ddpm:tiny", **{"train.progress_bar": "maybe"})


@pytest.mark.slow  # trains a model end to end: not in `make test-fast`
def test_load_sample_evaluate_and_strips_reuse_the_compiled_sampler(tiny_run):
    _, workdir = tiny_run
    run = api.load(workdir)
    assert run.step == 4 and list(run.metrics["step"]) == [2, 4]
    assert np.isfinite(run.metrics["loss"]).all()
    x = run.sample(2, sampler="ddim", steps=2, seed=0)
    assert x.shape == (2, 32, 32, 1) and x.dtype == np.uint8
    n_tasks = len(run._tasks)
    assert np.array_equal(run.sample(2, sampler="ddim", steps=2, seed=0), x)
    assert not np.array_equal(run.sample(2, sampler="ddim", steps=2, seed=1), x)
    assert len(run._tasks) == n_tasks  # same sampler, steps and batch: no new compile
    with pytest.raises(ConfigError, match="guidance_scale"):
        run.sample(2, sampler="ddim", steps=2, guidance=2.0)  # no condition dropout
    frames, times = run.reverse_strip(2, sampler="ddim", steps=2)
    assert frames.shape == (3, 32, 32, 1) and times[-1] == 0 and np.all(np.diff(times) < 0)
    fwd, ft = run.forward_strip(4)
    assert fwd.shape == (4, 32, 32, 1) and ft[0] == 0 and np.all(np.diff(ft) > 0)
    report = run.evaluate(metrics=("loss",))
    assert report["step"] == 4 and np.isfinite(report["test_loss"])
    assert not os.path.exists(os.path.join(workdir, "eval"))  # save=False writes nothing


@pytest.mark.slow  # trains a model end to end: not in `make test-fast`
def test_two_configs_in_one_process_give_what_each_gives_alone(tiny_run):
    _, workdir = tiny_run
    kw = {"sampler": "ddim", "steps": 2, "seed": 3}
    a = api.load(workdir)
    xa = a.sample(2, **kw)
    b = api.load(workdir, overrides={"diffusion.schedule": "cosine"})
    xb = b.sample(2, **kw)
    assert not np.array_equal(xa, xb)  # the schedule reached b's sampler
    assert np.array_equal(a.sample(2, **kw), xa)  # and did not leak into a's
    assert np.array_equal(api.load(workdir, {"diffusion.schedule": "cosine"}).sample(2, **kw), xb)


def test_sweep_names_points_and_parses_the_command_line():
    points = sweep.grid_points({"model.activation": ["silu", "gelu"], "seed": [0, 1]})
    assert len(points) == 4 and points[1] == {"model.activation": "silu", "seed": 1}
    assert sweep.point_name({"model.attention_resolutions": (), "model.activation": "gelu"}) == (
        "attention_resolutions=none,activation=gelu"
    )
    assert sweep.split_list("[(),(16,),x]") == ["()", "(16,)", "x"]
    spec, root, grid, pts, over, ev, steps, parallel, keep = sweep.parse_args(
        [
            "--config=ddpm:tiny",
            "--root",
            "/tmp/r",
            "--grid=model.attention_resolutions=[(),(16,)]",
            "--point=model.activation=gelu;seed=2",
            "--config.train.num_steps=3",
            "--steps=1,3",
            "--parallel",
            "3",
            "--keep_going",
        ]
    )
    assert grid == {"model.attention_resolutions": ["()", "(16,)"]}
    assert pts == [{"model.activation": "gelu", "seed": "2"}] and over == {"train.num_steps": "3"}
    assert (spec, root, ev, steps, parallel, keep) == ("ddpm:tiny", "/tmp/r", True, [1, 3], 3, True)
    with pytest.raises(ConfigError, match="--parallel='-1' must be an integer >= 0"):
        sweep.parse_args(["--config=ddpm:tiny", "--root=/tmp/r", "--parallel=-1"])
    with pytest.raises(ConfigError, match="parallel=-1 must be an integer >= 0"):
        sweep.run(api.config("ddpm:tiny"), [{}], "/nonexistent/x", parallel=-1)
    with pytest.raises(ConfigError, match="Did you mean"):
        sweep.run(api.config("ddpm:tiny"), {"model.activaton": ["gelu"]}, "/nonexistent/x")
    assert sweep.main(["--root=/tmp/x"]) == 2


@pytest.mark.slow
def test_sweep_trains_each_point_resumes_and_collects(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, **SMALL_UNET, **{"train.checkpoint_every": 1})
    cfg.eval.metrics = ("loss",)
    root = str(tmp_path / "sweep")
    grid = {"train.log_every": [1, 2]}
    df = sweep.run(cfg, grid, root, steps=[1, 2])
    assert list(df["train.log_every"]) == [1, 1, 2, 2] and list(df["step"]) == [1, 2, 1, 2]
    assert np.isfinite(df["test_loss"]).all()
    assert os.path.exists(os.path.join(root, "results.csv"))
    # Interrupt one point after step 1: its step-2 checkpoint and report are gone.
    point = os.path.join(root, "log_every=2")
    os.remove(os.path.join(point, "eval", "step_000002.json"))
    import shutil

    shutil.rmtree(os.path.join(point, "checkpoints", "2"))
    logs = []
    df2 = sweep.run(cfg, grid, root, steps=[1, 2], log=logs.append)
    assert sum("skipped" in line for line in logs) == 3  # only the lost step was redone
    assert "[sweep] log_every=2: training to step 2" in logs
    with open(os.path.join(point, "metrics.jsonl")) as f:
        assert [json.loads(x)["step"] for x in f] == [1, 2]  # resumed at 1, not restarted
    assert np.allclose(df2["test_loss"], df["test_loss"])  # resumed run is bit-identical


@pytest.mark.slow
def test_parallel_sweep_in_worker_processes_equals_the_in_process_sweep(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, **SMALL_UNET, **{"train.checkpoint_every": 1})
    cfg.eval.metrics = ("loss",)
    grid = {"train.log_every": [1, 2]}
    df = sweep.run(cfg, grid, str(tmp_path / "a"), steps=[1, 2])
    logs = []
    dp = sweep.run(cfg, grid, str(tmp_path / "b"), steps=[1, 2], parallel=2, log=logs.append)
    assert list(dp["step"]) == [1, 2, 1, 2] and np.allclose(dp["test_loss"], df["test_loss"])
    assert sum("finished" in line for line in logs) == 2
    logs.clear()
    sweep.run(cfg, grid, str(tmp_path / "b"), steps=[1, 2], parallel=2, log=logs.append)
    assert logs == ["[sweep] log_every=1: done, skipped", "[sweep] log_every=2: done, skipped"]


FAKE_WORKER = """
import json, os, sys, time
job = json.load(open(sys.argv[1]))
workdir = os.path.dirname(sys.argv[1])
with open(os.path.join(workdir, "times"), "w") as f:
    f.write(f"{time.time()} ")
    time.sleep(0.3)
    f.write(f"{time.time()} {os.environ['XLA_PYTHON_CLIENT_PREALLOCATE']}")
print("worker of", job["point"])
sys.exit(3 if job["point"].get("seed") == 2 else 0)
"""


def test_parallel_sweep_runs_points_in_at_most_n_processes_and_reports_failures(
    tmp_path, monkeypatch
):
    """The process pool alone: a stand-in worker (no JAX) per point, two at a time."""
    import sys

    script = tmp_path / "worker.py"
    script.write_text(FAKE_WORKER)
    monkeypatch.setattr(sweep, "worker_command", lambda job: [sys.executable, str(script), job])
    root, logs = str(tmp_path / "sweep"), []
    cfg = api.config("ddpm:tiny")
    points = [{"seed": s} for s in (0, 1, 2)]
    with pytest.raises(sweep.SweepError, match=r"1 sweep point\(s\) failed:\nseed=2 \(exit 3") as e:
        sweep.run(cfg, points, root, steps=[1], log=logs.append, parallel=2)
    assert "worker of {'seed': 2}" in str(e.value)  # the end of its log
    spans = []
    for s in (0, 1, 2):
        with open(os.path.join(root, f"seed={s}", "times")) as f:
            start, end, preallocate = f.read().split()
        spans.append((float(start), float(end)))
        assert preallocate == "false"  # each worker takes the memory it uses
    overlap = max(sum(a < t + 0.01 < b for a, b in spans) for t, _ in spans)
    assert overlap == 2  # two at once, never more
    assert sum("started" in line for line in logs) == 3 and any("FAILED" in x for x in logs)
    logs.clear()  # again, keeping going: only the failed point is its log's failure line
    df = sweep.run(cfg, points, root, steps=[1], log=logs.append, parallel=2, keep_going=True)
    assert list(df["point"]) == ["seed=0", "seed=1", "seed=2"]  # the table still
    assert any(line.startswith("[sweep] 1 sweep point(s) failed:\nseed=2") for line in logs)


def test_worker_job_files_are_json_and_give_back_the_config_with_its_types(tmp_path):
    """--parallel hands each worker its job as JSON (never a pickle): every config of
    configs/ comes back equal, tuples as tuples; a value JSON cannot hold is refused by
    its field before any process starts."""
    import glob

    from diffax_lab import config_lib

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = str(tmp_path / sweep.JOB_FILE)
    assert path.endswith(".json")
    names = sorted(os.path.basename(p)[:-3] for p in glob.glob(f"{root}/configs/*.py"))
    assert len(names) >= 10
    point = {"model.channel_mult": (1, 2), "seed": 3}
    for name in names:
        cfg = config_lib.load_config(name)
        sweep.write_job(path, cfg=cfg, point=point, root="r", evaluate=True, steps=[1, 2])
        with open(path) as f:
            json.load(f)  # plain JSON
        job = sweep.read_job(path)
        assert job["cfg"].to_dict() == cfg.to_dict(), name
        assert (job["point"], job["steps"], job["evaluate"]) == (point, [1, 2], True)
    assert isinstance(job["cfg"].model.channel_mult, tuple)
    cfg = config_lib.load_config("ddpm:tiny")
    cfg.model.channel_mult = (1, np.int64(2))  # numpy integers are not JSON
    with pytest.raises(ConfigError, match=r"config\.model\.channel_mult: a worker process"):
        sweep.write_job(path, cfg=cfg, point={}, root="r", evaluate=True, steps=None)


def test_grid_figure_lays_out_images_with_titles():
    import matplotlib

    matplotlib.use("Agg")
    x = np.zeros((5, 4, 4, 1), np.uint8)
    fig = api.grid_figure(x, titles=list("abcde"), ncols=3)
    assert len(fig.axes) == 6  # 2 rows of 3, the last one empty
    assert [ax.get_title() for ax in fig.axes[:5]] == list("abcde")
    assert len(fig.axes[5].images) == 0


def test_train_parallel_hands_each_run_to_a_worker_and_names_the_failed(tmp_path, monkeypatch):
    """api.train_parallel's process side, with a stand-in worker (no JAX)."""
    import sys

    script = tmp_path / "worker.py"
    script.write_text(
        "import json, sys\n"
        "job = json.load(open(sys.argv[1]))\n"
        "train = job['cfg']['train']\n"
        "print('trains', job['workdir'], train['num_steps'], train['progress_bar'])\n"
        "sys.exit(1 if job['workdir'].endswith('b') else 0)\n"
    )
    monkeypatch.setattr(sweep, "worker_command", lambda job: [sys.executable, str(script), job])
    runs = {str(tmp_path / d): api.config("ddpm:tiny", **{"train.num_steps": 3}) for d in "ab"}
    logs = []
    with pytest.raises(sweep.SweepError, match=r"1 run\(s\) failed:\n.*b \(exit 1") as e:
        api.train_parallel(runs, log=logs.append)
    assert f"trains {tmp_path / 'b'} 3 False" in str(e.value)
    assert sum("started" in line for line in logs) == 2
    with pytest.raises(ConfigError, match="model.norm"):  # checked before any process starts
        api.train_parallel({str(tmp_path / "c"): api.config("ddpm:tiny", **{"model.norm": "x"})})
