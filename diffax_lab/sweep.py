"""Sweeps: a grid of config overrides, one workdir a point, trained and evaluated, resumable.

    python -m diffax_lab.sweep --config=configs/ddpm.py:tiny --root=workdirs/sweep \
        --grid='model.activation=[silu,gelu]' --grid='model.downsample=[conv,rearrange]' \
        [--point='model.activation=relu;model.time_embedding=channel' ...] \
        [--config.train.num_steps=500 ...] [--steps=100,200,400] [--no_eval] [--parallel=N] [--keep_going]

Each point is trained with ``modes.train.run`` in ROOT/<name> (the name spells its
overrides), then evaluated once with ``modes.evaluate.run`` (ROOT/<name>/eval/step_N.json).
A point whose final checkpoint and evaluation exist is skipped; an interrupted one resumes
from its newest checkpoint (the train mode's own resume). ``--steps`` trains each point to
each of the step counts in turn and evaluates it there (curves over steps). The reports are collected into
one table, ROOT/results.csv, with a column per swept field. ``--grid`` takes the product
of its fields; ``--point`` adds explicit points (``;`` between a point's assignments), for
ablations that change one thing at a time. Values are typed as the config's fields.

``--parallel=N`` (``parallel=N`` from Python; 0, the default, runs every point in this
process) runs up to N points at once, each in its own worker process
(``python -m diffax_lab.sweep --worker=ROOT/<name>/sweep_job.json``, output in
ROOT/<name>/sweep.log), e.g. the arms of an ablation sharing one GPU. Workers allocate
accelerator memory as they need it (XLA_PYTHON_CLIENT_PREALLOCATE=false; each capped at this
process's XLA_PYTHON_CLIENT_MEM_FRACTION), so N small runs take what they use, not N
preallocated shares; keep this process off the accelerator meanwhile. Finished points are
skipped and interrupted ones resume exactly as in-process. A failed point is reported with
the end of its log once the others finish: an error, or with ``keep_going`` (``--keep_going``)
a log line, the table holding the points that did finish.

From Python: ``diffax_lab.api.sweep(cfg, {"model.activation": ["silu", "gelu"]}, root)``,
or ``run(cfg, [{"model.activation": "gelu"}, {...}], root)`` for explicit points.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import re
import subprocess
import sys
import time

from ml_collections import ConfigDict

from diffax_lab import compilation, config_lib
from diffax_lab import workdir as workdir_lib
from diffax_lab.errors import ConfigError, DataError, WorkdirError
from diffax_lab.files import write_atomic
from diffax_lab.modes import evaluate as evaluate_mode
from diffax_lab.modes import train as train_mode

POINT_FILE = "sweep_point.json"
RESULTS = "results.csv"


class SweepError(RuntimeError):
    """Points of a parallel sweep failed (each named, with the end of its log)."""


JOB_FILE = "sweep_job.json"  # --parallel: what a worker process runs (JSON, never pickle)
LOG_FILE = "sweep.log"  # --parallel: a worker's stdout and stderr


def grid_points(grid) -> list[dict]:
    """``{"a": [1, 2], "b": [3]}`` -> the product as dicts; a list of dicts as it is."""
    if isinstance(grid, dict):
        keys = list(grid)
        for k in keys:
            if isinstance(grid[k], str) or not hasattr(grid[k], "__iter__"):
                raise ConfigError(f"sweep grid {k!r}: give a list of values, not {grid[k]!r}.")
        return [dict(zip(keys, vals, strict=True)) for vals in itertools.product(*grid.values())]
    return [dict(p) for p in grid]


def _text(value) -> str:
    if isinstance(value, list | tuple):
        return "-".join(_text(v) for v in value) or "none"
    return str(value)


def point_name(point: dict) -> str:
    """A directory name that spells the overrides: ``activation=gelu,downsample=rearrange``
    (the last part of each dotted field; the whole field where two would clash)."""
    if not point:
        return "base"
    short = [k.rsplit(".", 1)[-1] for k in point]
    keys = short if len(set(short)) == len(short) else list(point)
    parts = [f"{k}={_text(v)}" for k, v in zip(keys, point.values(), strict=True)]
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(parts))


def point_config(cfg, point: dict):
    """A copy of ``cfg`` with the point's overrides (checked, typed as the fields)."""
    return config_lib.apply_string_overrides(copy.deepcopy(cfg), point)


def typed_point(cfg, point: dict) -> dict:
    """The point's values as the config holds them (``"()"`` from the command line -> ()),
    so a point has one name however it was written; unknown fields are refused."""
    c = point_config(cfg, point)
    return {k: config_lib.get_field(c, k) for k in point}


def report_path(workdir: str, step: int) -> str:
    return os.path.join(workdir, "eval", f"step_{step:06d}.json")


def is_finished(workdir: str, num_steps: int, evaluate: bool = True) -> bool:
    """The point's final checkpoint (and, with ``evaluate``, its evaluation) exist."""
    steps = workdir_lib.checkpoint_steps(workdir) if os.path.isdir(workdir) else []
    if num_steps not in steps:
        return False
    return not evaluate or os.path.exists(report_path(workdir, num_steps))


def _stops(cfg, point: dict, steps) -> list[int]:
    return sorted(set(steps)) if steps else [point_config(cfg, point).train.num_steps]


def _write_point_file(workdir: str, point: dict) -> None:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, POINT_FILE), "w") as f:
        json.dump({k: _jsonable(v) for k, v in point.items()}, f)


def run_point(cfg, point: dict, root: str, evaluate: bool = True, steps=None, log=print) -> str:
    """Trains (or resumes) and evaluates one point; returns its workdir. With ``steps``
    (ascending step counts), the run is trained to each in turn and evaluated there."""
    c = point_config(cfg, point)
    workdir = os.path.join(root, point_name(point))
    name = point_name(point)
    stops = _stops(cfg, point, steps)
    _write_point_file(workdir, point)
    for stop in stops:
        if is_finished(workdir, stop, evaluate):
            log(f"[sweep] {name} step {stop}: done, skipped")
            continue
        c.train.num_steps = stop
        log(f"[sweep] {name}: training to step {stop}")
        train_mode.run(c, workdir)
        if evaluate:
            log(f"[sweep] {name}: evaluating step {stop}")
            c.eval.checkpoint_step = stop
            evaluate_mode.run(c, workdir)
            c.eval.checkpoint_step = 0
    return workdir


def _jsonable(v):
    return list(v) if isinstance(v, tuple) else v


def collect(root: str, points=None):
    """The evaluations of each point under ``root`` (one row per evaluated step) as a
    DataFrame: the swept fields, the point's directory, then the report's numbers. Also
    written to ROOT/results.csv."""
    import glob

    import pandas as pd

    rows = []
    names = [point_name(p) for p in points] if points is not None else sorted(os.listdir(root))
    for name in names:
        workdir = os.path.join(root, name)
        point_file = os.path.join(workdir, POINT_FILE)
        if not os.path.exists(point_file):
            continue
        with open(point_file) as f:
            point = {k: _text(v) if isinstance(v, list) else v for k, v in json.load(f).items()}
        reports = sorted(
            glob.glob(os.path.join(workdir, "eval", "step_[0-9][0-9][0-9][0-9][0-9][0-9].json"))
        )
        for path in reports or [None]:
            report = {}
            if path:
                with open(path) as f:
                    report = json.load(f)
            rows.append({**point, "point": name, **report})
    df = pd.DataFrame(rows)
    if len(df):
        df.to_csv(os.path.join(root, RESULTS), index=False)
    return df


def run(
    cfg,
    grid,
    root: str,
    evaluate: bool = True,
    steps=None,
    log=print,
    parallel: int = 0,
    keep_going: bool = False,
):
    """Every point of ``grid`` (a dict of lists: their product; or a list of dicts) trained
    and evaluated under ``root`` (at each of ``steps`` when given, else at train.num_steps);
    finished points are skipped. ``parallel`` >= 1 runs that many points at once, each in
    its own worker process (0: all in this process). A failed point raises ``SweepError``
    after the others ran; with ``keep_going`` it is logged instead. Returns ``collect``'s
    table."""
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 0:
        raise ConfigError(
            f"sweep parallel={parallel!r} must be an integer >= 0 (0 = in this process, "
            "N = N worker processes at a time)."
        )
    points = [typed_point(cfg, p) for p in grid_points(grid)]  # checked before any training
    if not points:
        raise ConfigError("The sweep has no points: give --grid or --point.")
    names = [point_name(p) for p in points]
    if len(set(names)) != len(names):
        raise ConfigError(f"Two sweep points share a directory name: {names}.")
    if steps is not None and (
        not steps or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in steps)
    ):
        raise ConfigError(f"sweep steps={steps!r} must be positive integers (or None).")
    os.makedirs(root, exist_ok=True)
    if parallel:
        failed = run_parallel(cfg, points, root, evaluate, steps, log, parallel)
    else:
        failed = []
        for p in points:
            try:
                run_point(cfg, p, root, evaluate, steps, log)
            except Exception as e:  # noqa: BLE001 (reported below, or re-raised)
                if not keep_going:
                    raise
                failed.append(f"{point_name(p)}: {e!r}")
    if failed:
        message = f"{len(failed)} sweep point(s) failed:\n" + "\n".join(failed)
        if not keep_going:
            raise SweepError(message)
        log(f"[sweep] {message}")
    return collect(root, points)


# ----- points in parallel processes -----
def worker_command(job_file: str) -> list[str]:
    """The command that runs one point's job file (tests replace it)."""
    return [sys.executable, "-m", "diffax_lab.sweep", f"--worker={job_file}"]


def worker_env() -> dict:
    """This process's environment with on-demand accelerator memory (each worker takes what
    it uses, up to this process's fraction) and diffax_lab importable wherever it runs."""
    env = dict(os.environ)
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    return env


def run_parallel(cfg, points, root: str, evaluate: bool, steps, log, parallel: int) -> list:
    """Each unfinished point in its own worker process, at most ``parallel`` at a time;
    returns the failures (name, exit status, log path and the end of the log)."""
    todo = []
    for p in points:
        workdir = os.path.join(root, point_name(p))
        _write_point_file(workdir, p)  # collect() finds even a point that fails
        if all(is_finished(workdir, s, evaluate) for s in _stops(cfg, p, steps)):
            log(f"[sweep] {point_name(p)}: done, skipped")
            continue
        job = os.path.join(workdir, JOB_FILE)
        write_job(job, cfg=cfg, point=p, root=root, evaluate=evaluate, steps=steps)
        todo.append((point_name(p), job, os.path.join(workdir, LOG_FILE)))
    return run_jobs(todo, log, parallel)


def run_jobs(todo: list, log, parallel: int) -> list:
    """(name, job file, log file) each in a worker process, ``parallel`` at a time; returns
    the failures with the end of their logs."""
    todo = list(todo)
    env = worker_env()
    running: dict = {}
    failed = []
    while todo or running:
        while todo and len(running) < parallel:
            name, job, log_path = todo.pop(0)
            out = open(log_path, "ab")  # noqa: SIM115 (closed when the process ends)
            proc = subprocess.Popen(
                worker_command(job), stdout=out, stderr=subprocess.STDOUT, env=env
            )
            running[proc] = (name, log_path, out, time.monotonic())
            log(f"[sweep] {name}: started (process {proc.pid}, log {log_path})")
        time.sleep(0.2)
        for proc in [p for p in running if p.poll() is not None]:
            name, log_path, out, t0 = running.pop(proc)
            out.close()
            seconds = time.monotonic() - t0
            if proc.returncode:
                failed.append((name, proc.returncode, log_path))
                log(f"[sweep] {name}: FAILED (exit {proc.returncode}, {seconds:.0f} s)")
            else:
                log(f"[sweep] {name}: finished ({seconds:.0f} s)")
    reports = []
    for name, rc, log_path in failed:
        with open(log_path, errors="replace") as f:
            tail = f.read()[-1500:]
        reports.append(f"{name} (exit {rc}, {log_path}):\n{tail}")
    return reports


def train_parallel(runs: dict, parallel: int, log=print) -> None:
    """Trains ``{workdir: config}`` (different tasks, say a model and its judge) at once,
    each in its own worker process (``parallel`` at a time); a finished workdir costs
    nothing, an interrupted one resumes. Raises ``SweepError`` naming the failed ones."""
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise ConfigError(f"train_parallel parallel={parallel!r} must be an integer >= 1.")
    todo = []
    for workdir, cfg in runs.items():
        if is_finished(workdir, cfg.train.num_steps, evaluate=False):
            log(f"[train] {workdir}: done, skipped")
            continue
        os.makedirs(workdir, exist_ok=True)
        job = os.path.join(workdir, JOB_FILE)
        write_job(job, cfg=cfg, workdir=workdir)
        todo.append((workdir, job, os.path.join(workdir, LOG_FILE)))
    failed = run_jobs(todo, log, parallel)
    if failed:
        raise SweepError(f"{len(failed)} run(s) failed:\n" + "\n".join(failed))


def _tag_tuples(value):
    """JSON keeps lists only: tuples are written as {"__tuple__": [...]}, so that a config
    comes back with the types it left with (a tuple field stays a tuple)."""
    if isinstance(value, tuple):
        return {"__tuple__": [_tag_tuples(v) for v in value]}
    if isinstance(value, list):
        return [_tag_tuples(v) for v in value]
    if isinstance(value, dict):
        return {k: _tag_tuples(v) for k, v in value.items()}
    return value


def _untag_tuples(value):
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_untag_tuples(v) for v in value["__tuple__"])
        return {k: _untag_tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_untag_tuples(v) for v in value]
    return value


def write_job(path: str, *, cfg, **job) -> None:
    """A worker's job (``cfg``, a ConfigDict, and plain values) as JSON, written atomically.
    A config value JSON cannot hold is refused by its field, before any process starts."""
    data = {"cfg": cfg.to_dict(), **job}
    try:
        text = json.dumps(_tag_tuples(data), allow_nan=True)
    except TypeError as e:
        bad = [f for f, v in _flat(data["cfg"]) if not _json_ok(v)]
        raise ConfigError(
            f"{', '.join(bad) or 'a sweep value'}: a worker process receives its config as "
            f"JSON, which cannot hold this value ({e}); use a number, string, bool, None, "
            "or a list or tuple of them."
        ) from e
    write_atomic(path, text)


def _flat(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"config.{prefix}{k}", v


def _json_ok(v) -> bool:
    try:
        json.dumps(_tag_tuples(v))
        return True
    except TypeError:
        return False


def read_job(path: str) -> dict:
    """``write_job``'s file: its values, ``cfg`` a ConfigDict again."""
    with open(path) as f:
        job = _untag_tuples(json.load(f))
    job["cfg"] = ConfigDict(job["cfg"])
    return job


def run_worker(job_file: str) -> int:
    """``--worker=FILE``: runs one point's job (or one training run's) in this process."""
    job = read_job(job_file)
    compilation.enable_persistent_cache()  # points of one sweep share compiled programs
    compilation.configure_cpu_runtime()
    if "workdir" in job:
        train_mode.run(job["cfg"], job["workdir"])
    else:
        run_point(job["cfg"], job["point"], job["root"], job["evaluate"], job["steps"])
    return 0


# ----- the command line -----
def split_list(text: str) -> list[str]:
    """``"[a,(1,2),b]"`` -> ["a", "(1,2)", "b"]: commas outside brackets separate."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    items, depth, cur = [], 0, ""
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            items.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        items.append(cur.strip())
    return items


def parse_args(argv: list[str]):
    """(config spec, root, grid dict, explicit points, config overrides, evaluate, steps,
    parallel, keep_going)."""
    spec = root = None
    parallel, keep_going = 0, False
    grid: dict = {}
    points: list = []
    overrides: dict = {}
    evaluate = True
    steps = None
    args = iter(argv)
    for a in args:
        name, eq, value = a.partition("=")
        if name in ("--config", "--root", "--grid", "--point", "--steps", "--parallel") and not eq:
            value = next(args, "")
        if name == "--config":
            spec = value
        elif name == "--root":
            root = value
        elif name == "--grid":
            field, eq2, values = value.partition("=")
            if not eq2:
                raise ConfigError(f"--grid={value!r}: write --grid='field=[v1,v2]'.")
            grid[field] = split_list(values)
        elif name == "--point":
            point = {}
            for assignment in filter(None, value.split(";")):
                field, eq2, v = assignment.partition("=")
                if not eq2:
                    raise ConfigError(f"--point={value!r}: write --point='a.b=1;c.d=x'.")
                point[field.strip()] = v.strip()
            points.append(point)
        elif name.startswith("--config."):
            overrides[name[len("--config.") :]] = value if eq else next(args, "")
        elif name == "--steps":
            steps = [int(v) for v in split_list(value)]
        elif name == "--no_eval":
            evaluate = False
        elif name == "--parallel":
            if not value.isdigit():
                raise ConfigError(f"--parallel={value!r} must be an integer >= 0.")
            parallel = int(value)
        elif name == "--keep_going":
            keep_going = True
        else:
            raise ConfigError(f"Unknown argument {a!r}; see python -m diffax_lab.sweep --help.")
    if not spec or not root:
        raise ConfigError("--config and --root are required (see the module's docstring).")
    return spec, root, grid, points, overrides, evaluate, steps, parallel, keep_going


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(__doc__)
        return 0
    if len(argv) == 1 and argv[0].startswith("--worker="):
        return run_worker(argv[0].partition("=")[2])
    try:
        spec, root, grid, points, overrides, evaluate, steps, parallel, keep_going = parse_args(
            argv
        )
        cfg = config_lib.apply_string_overrides(config_lib.load_config(spec), overrides)
        all_points = (grid_points(grid) if grid else []) + points
        df = run(cfg, all_points, root, evaluate, steps, parallel=parallel, keep_going=keep_going)
    except (ConfigError, DataError, WorkdirError, FileNotFoundError, SweepError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import pandas as pd

    with pd.option_context("display.max_columns", 12, "display.width", 160):
        print(df)
    print(f"Wrote {os.path.join(root, RESULTS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
