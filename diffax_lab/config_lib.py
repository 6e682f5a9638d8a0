"""Configs as data: load a config file (with its variant), build one config on another, apply
dotted overrides, read a run's saved config back, and check values.

The one place that turns ``configs/NAME.py[:VARIANT]`` into an ``ml_collections.ConfigDict``
(the command line, the configs that build on ``configs/ddpm.py``, the notebooks' API and the
tests all come here), and the small value checks every task's ``check_config`` uses. It
imports nothing of the lab above the floor.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import math
import os

from ml_collections import ConfigDict

from diffax_lab.errors import ConfigError

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
DEFAULT_CONFIG = "ddpm"  # completes saved configs with fields added since they were written


# ----- loading -----
def config_path(name: str) -> str:
    """``ddpm``, ``ddpm.py`` or a path -> the file's path (ConfigError if there is none)."""
    path = name if name.endswith(".py") else name + ".py"
    if not os.path.isabs(path) and not os.path.exists(path):
        path = os.path.join(CONFIG_DIR, os.path.basename(path))
    if not os.path.isfile(path):
        known = sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py"))
        raise ConfigError(f"No config file {name!r}; the lab's configs are {known} (in configs/).")
    return path


def load_config(spec: str, **overrides) -> ConfigDict:
    """``"ddpm:tiny"`` or ``"configs/ddpm.py:tiny"`` (+ dotted overrides) -> ConfigDict."""
    name, _, arg = spec.partition(":")
    path = config_path(name)
    module_name = "diffax_configs_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    return apply_overrides(config, overrides) if overrides else config


def base(name: str, arg: str | None = None) -> ConfigDict:
    """A config to build another on (``base("ddpm", "tiny")`` in configs/cfg.py)."""
    return load_config(f"{name}:{arg or ''}")


def parse_variants(arg: str | None, allowed, file: str) -> tuple[str, ...]:
    """``"cpu,clean"`` -> ("cpu", "clean"), refusing variants the config file lacks."""
    variants = tuple(v for v in (arg or "").split(",") if v)
    unknown = sorted(set(variants) - set(allowed))
    if unknown:
        raise ConfigError(
            f"Unknown variant(s) {unknown} of {file}; choose from {tuple(allowed)}, "
            "comma-separated (e.g. --config=configs/ddpm.py:tiny)."
        )
    return variants


def did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


def check_field_exists(config: ConfigDict, dotted: str) -> None:
    """ConfigError naming an unknown field (with the closest known one) of ``dotted``."""
    node, parts = config, dotted.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, ConfigDict) or part not in node:
            where = ".".join(parts[:i]) or "config"
            keys = list(node.keys()) if isinstance(node, ConfigDict) else []
            raise ConfigError(
                f"config.{dotted}: {where} has no field {part!r}.{did_you_mean(part, keys)} "
                f"Its fields: {', '.join(sorted(keys))}."
            )
        node = node[part]


def apply_overrides(config: ConfigDict, overrides: dict) -> ConfigDict:
    """Sets ``{"train.num_steps": 10, ...}`` on ``config``; unknown fields are refused."""
    for dotted, value in overrides.items():
        check_field_exists(config, dotted)
        *path, last = dotted.split(".")
        node = config
        for p in path:
            node = node[p]
        node[last] = tuple(value) if isinstance(value, list) else value
    return config


def parse_value(text: str, current):
    """A command-line string as the type of the field's current value."""
    if not isinstance(text, str):
        return text
    if isinstance(current, str):
        return text
    if isinstance(current, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"expected True or False, got {text!r}")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, tuple | list):
        if isinstance(value, str):  # "a,b" or a single item
            value = tuple(v for v in text.split(",") if v)
        value = tuple(value) if isinstance(value, list | tuple) else (value,)
    return value


def apply_string_overrides(config: ConfigDict, overrides: dict) -> ConfigDict:
    """--config.X=V flags (V as text) onto ``config``, each checked and typed as the field.
    Unknown fields and values of the wrong type are refused in one line."""
    for dotted, text in overrides.items():
        check_field_exists(config, dotted)
        current = get_field(config, dotted)
        try:
            value = parse_value(text, current)
            apply_overrides(config, {dotted: value})
        except (TypeError, ValueError) as e:
            raise ConfigError(
                f"--config.{dotted}={text}: {e}. The field holds a {type(current).__name__} "
                f"(now {current!r})."
            ) from None
    return config


# ----- saved run configs -----
def with_defaults(saved: dict, defaults: dict) -> dict:
    """A saved config completed with fields added to the lab since it was written (the
    saved values win): older runs stay loadable for sampling and evaluation."""
    out = dict(defaults)
    for k, v in saved.items():
        out[k] = (
            with_defaults(v, defaults[k])
            if isinstance(v, dict) and isinstance(defaults.get(k), dict)
            else v
        )
    return out


def migrate(saved: dict) -> dict:
    """Names that older runs did not save: the task of a text-to-image run (then told apart by
    ``model.cond_dim > 0``) and the model of every run (then implied by the task)."""
    saved = json.loads(json.dumps(saved))
    task = saved.get("task", "diffusion")
    if task == "diffusion" and saved.get("model", {}).get("cond_dim", 0):
        task = "text2img"
    saved["task"] = task
    model = saved.setdefault("model", {})
    model.setdefault("name", {"classifier": "classifier", "clip": "clip"}.get(task, "unet"))
    return saved


def saved_config_path(workdir: str) -> str:
    return os.path.join(workdir, "config.json")


def read_saved(workdir: str) -> dict | None:
    """The migrated config.json of ``workdir`` as a dict, or None if it has none."""
    path = saved_config_path(workdir)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return migrate(json.load(f))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is unreadable ({e}); restore it from a copy.") from e


def load_run_config(workdir: str, field: str = "--workdir") -> ConfigDict:
    """The ConfigDict saved in ``workdir``/config.json, completed with current defaults."""
    saved = read_saved(workdir)
    if saved is None:
        raise ConfigError(
            f"{field}={workdir!r} holds no config.json (no run there): train one there "
            "first, or give --config."
        )
    defaults = json.loads(load_config(DEFAULT_CONFIG).to_json())
    return ConfigDict(with_defaults(saved, defaults))


# ----- value checks (used by the tasks' check_config) -----
def get_field(config, field: str):
    node = config
    for part in field.split("."):
        node = node[part]
    return node


def check_number(
    config, field, *, low=None, high=None, low_open=False, high_open=False, integer=False
):
    """ConfigError unless config.<field> is a finite number (an int if ``integer``) in range."""
    value = get_field(config, field)
    kind = "an integer" if integer else "a number"
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (integer and not isinstance(value, int))
    ):
        raise ConfigError(f"config.{field} must be {kind}, got {value!r}.")
    if not math.isfinite(value):
        raise ConfigError(f"config.{field} must be finite, got {value!r}.")
    lo_ok = low is None or (value > low if low_open else value >= low)
    hi_ok = high is None or (value < high if high_open else value <= high)
    if not (lo_ok and hi_ok):
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        left = "(" if low_open or low is None else "["
        right = ")" if high_open or high is None else "]"
        raise ConfigError(
            f"config.{field}={value!r} is outside the allowed range {left}{lo}, {hi}{right}."
        )


def check_choice(config, field, choices):
    value = get_field(config, field)
    if value not in choices:
        raise ConfigError(f"config.{field}={value!r} must be one of {sorted(choices)}.")
