"""Sweeps: a grid of config overrides, one workdir a point, trained and evaluated, resumable.

    python -m diffax_lab.sweep --config=configs/ddpm.py:tiny --root=workdirs/sweep \
        --grid='model.activation=[silu,gelu]' --grid='model.downsample=[conv,rearrange]' \
        [--point='model.activation=relu;model.time_embedding=channel' ...] \
        [--config.train.num_steps=500 ...] [--steps=100,200,400] [--no_eval]

Each point is trained with ``modes.train.run`` in ROOT/<name> (the name spells its
overrides), then evaluated once with ``modes.evaluate.run`` (ROOT/<name>/eval/step_N.json).
A point whose final checkpoint and evaluation exist is skipped; an interrupted one resumes
from its newest checkpoint (the train mode's own resume). ``--steps`` trains each point to
each of the step counts in turn and evaluates it there (curves over steps). The reports are collected into
one table, ROOT/results.csv, with a column per swept field. ``--grid`` takes the product
of its fields; ``--point`` adds explicit points (``;`` between a point's assignments), for
ablations that change one thing at a time. Values are typed as the config's fields.

From Python: ``diffax_lab.api.sweep(cfg, {"model.activation": ["silu", "gelu"]}, root)``,
or ``run(cfg, [{"model.activation": "gelu"}, {...}], root)`` for explicit points.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import re
import sys

from diffax_lab import config_lib
from diffax_lab import workdir as workdir_lib
from diffax_lab.errors import ConfigError, DataError, WorkdirError
from diffax_lab.modes import evaluate as evaluate_mode
from diffax_lab.modes import train as train_mode

POINT_FILE = "sweep_point.json"
RESULTS = "results.csv"


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


def run_point(cfg, point: dict, root: str, evaluate: bool = True, steps=None, log=print) -> str:
    """Trains (or resumes) and evaluates one point; returns its workdir. With ``steps``
    (ascending step counts), the run is trained to each in turn and evaluated there."""
    c = point_config(cfg, point)
    workdir = os.path.join(root, point_name(point))
    name = point_name(point)
    stops = sorted(set(steps)) if steps else [c.train.num_steps]
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, POINT_FILE), "w") as f:
        json.dump({k: _jsonable(v) for k, v in point.items()}, f)
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


def run(cfg, grid, root: str, evaluate: bool = True, steps=None, log=print):
    """Every point of ``grid`` (a dict of lists: their product; or a list of dicts) trained
    and evaluated under ``root`` (at each of ``steps`` when given, else at train.num_steps);
    finished points are skipped. Returns ``collect``'s table."""
    points = [typed_point(cfg, p) for p in grid_points(grid)]  # checked before any training
    if not points:
        raise ConfigError("The sweep has no points: give --grid or --point.")
    names = [point_name(p) for p in points]
    if len(set(names)) != len(names):
        raise ConfigError(f"Two sweep points share a directory name: {names}.")
    os.makedirs(root, exist_ok=True)
    for p in points:
        run_point(cfg, p, root, evaluate, steps, log)
    return collect(root, points)


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
    """(config spec, root, grid dict, explicit points, config overrides, evaluate, steps)."""
    spec = root = None
    grid: dict = {}
    points: list = []
    overrides: dict = {}
    evaluate = True
    steps = None
    args = iter(argv)
    for a in args:
        name, eq, value = a.partition("=")
        if name in ("--config", "--root", "--grid", "--point", "--steps") and not eq:
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
        else:
            raise ConfigError(f"Unknown argument {a!r}; see python -m diffax_lab.sweep --help.")
    if not spec or not root:
        raise ConfigError("--config and --root are required (see the module's docstring).")
    return spec, root, grid, points, overrides, evaluate, steps


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(__doc__)
        return 0
    try:
        spec, root, grid, points, overrides, evaluate, steps = parse_args(argv)
        cfg = config_lib.apply_string_overrides(config_lib.load_config(spec), overrides)
        all_points = (grid_points(grid) if grid else []) + points
        df = run(cfg, all_points, root, evaluate, steps)
    except (ConfigError, DataError, WorkdirError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import pandas as pd

    with pd.option_context("display.max_columns", 12, "display.width", 160):
        print(df)
    print(f"Wrote {os.path.join(root, RESULTS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
