"""The run directory: checks before anything is written, and the resolved config beside it.

A bad run never damages a good one: the workdir must be a real directory (not '' or '/'),
and a resumed run must have the same model, diffusion and data shape as its checkpoints.
"""

from __future__ import annotations

import json
import os

from diffax_lab.validation import ConfigError

# Sections (and fields) that define the shape and meaning of the saved state.
STATE_DEFINING = (
    "task",
    "classifier.noise",
    "model",
    "diffusion",
    "data.image_size",
    "data.channels",
    "optim.optimizer",
    "optim.grad_clip",
    "seed",
)


def check_workdir(workdir: str) -> str:
    if not workdir or not workdir.strip():
        raise ConfigError("--workdir is empty; give the run a directory of its own.")
    path = os.path.abspath(os.path.expanduser(workdir))
    if path == os.path.abspath(os.sep) or path == os.path.expanduser("~"):
        raise ConfigError(f"--workdir={workdir!r} resolves to {path}; use a directory of its own.")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--workdir={workdir!r} exists and is not a directory.")
    return path


def _lookup(d, dotted):
    for part in dotted.split("."):
        d = d[part]
    return d


def _canonical(value):
    return json.loads(json.dumps(value))  # tuples -> lists, as stored


def check_resume_compatible(workdir: str, config) -> None:
    """Refuses to resume a run whose state-defining fields differ from the saved config."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        saved = json.load(f)
    new = json.loads(config.to_json())
    diffs = []
    for field in STATE_DEFINING:
        try:
            old_v, new_v = _lookup(saved, field), _lookup(new, field)
        except KeyError:
            continue
        if _canonical(old_v) != _canonical(new_v):
            if isinstance(old_v, dict):
                diffs += [
                    f"{field}.{k}: {old_v.get(k)!r} -> {new_v.get(k)!r}"
                    for k in sorted(set(old_v) | set(new_v))
                    if _canonical(old_v.get(k)) != _canonical(new_v.get(k))
                ]
            else:
                diffs.append(f"{field}: {old_v!r} -> {new_v!r}")
    if diffs:
        raise ConfigError(
            f"{workdir} holds checkpoints of a different run ({'; '.join(diffs)}). "
            "Use a new --workdir, or the saved values (see config.json there)."
        )


def write_config(workdir: str, config) -> None:
    tmp = os.path.join(workdir, "config.json.tmp")
    with open(tmp, "w") as f:
        f.write(config.to_json(indent=2))
    os.replace(tmp, os.path.join(workdir, "config.json"))  # atomic: never half-written


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


def load_run_config(workdir: str):
    """The ConfigDict saved in ``workdir``/config.json, completed with current defaults."""
    import importlib.util

    from ml_collections import ConfigDict

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: is {workdir} a diffax_lab run?")
    with open(path) as f:
        saved = json.load(f)
    base = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    spec = importlib.util.spec_from_file_location(
        "diffax_configs_ddpm", os.path.join(base, "ddpm.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    defaults = json.loads(module.get_config().to_json())
    return ConfigDict(with_defaults(saved, defaults))
