"""Tasks by name: ``config.task`` -> the task class, and a trained run -> (task, params).

A task module registers its class with ``@register``; ``get(name)`` imports
``diffax_lab.tasks.<name>`` on first use (the one deliberate import by name), so the modes
and this module never import a task module themselves, and a test or a user package can
register a task of its own without touching any file of the lab.
"""

from __future__ import annotations

import importlib
import pkgutil

from diffax_lab import checkpointing
from diffax_lab.config_lib import did_you_mean, load_run_config
from diffax_lab.errors import ConfigError
from diffax_lab.tasks.base import Task

TASKS: dict[str, type[Task]] = {}
# Modules of this package that hold no task: what every task shares.
SHARED = ("base", "registry", "denoising")


def builtin_names() -> list[str]:
    """The task modules of this package: ``diffax_lab/tasks/<name>.py`` is task ``name``."""
    path = [__file__.rsplit("/", 1)[0]]
    return [m.name for m in pkgutil.iter_modules(path) if m.name not in SHARED]


def _where(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register(cls: type[Task]) -> type[Task]:
    """Class decorator: makes ``cls`` the task of ``config.task = cls.name``.

    A name belongs to one class: another class under a taken name, or under the name of
    one of the lab's own tasks (imported first to check), is refused (a run's config.json
    names its task, so the name must mean one thing). The same class defined
    again (a notebook cell run twice, a reloaded module: same module and qualified name)
    replaces the old definition."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a class attribute `name`.")
    builtin = f"diffax_lab.tasks.{cls.name}"
    if cls.name not in TASKS and cls.name in builtin_names() and cls.__module__ != builtin:
        importlib.import_module(builtin)  # the lab's own task of that name comes first
    held = TASKS.get(cls.name)
    if held is not None and _where(held) != _where(cls):
        raise ValueError(
            f"Task name {cls.name!r} is taken by {_where(held)}; give {_where(cls)} a `name` "
            "of its own."
        )
    TASKS[cls.name] = cls
    return cls


def get(name: str) -> type[Task]:
    if name not in TASKS and name in builtin_names():
        importlib.import_module(f"diffax_lab.tasks.{name}")  # registers itself
    if name not in TASKS:
        known = sorted(set(TASKS) | set(builtin_names()))
        raise ConfigError(
            f"config.task={name!r} must be one of {known}.{did_you_mean(name, known)}"
        )
    return TASKS[name]


def task_of(config) -> type[Task]:
    return get(config.get("task", "diffusion"))


def check_config(config) -> type[Task]:
    """The task class of ``config``, after its checks passed."""
    cls = task_of(config)
    cls.check_config(config)
    return cls


def build(config, mesh) -> Task:
    return task_of(config)(config, mesh)


def restore_run(workdir: str, mesh, field: str, task: str | None = None):
    """(task, EMA params) of the newest good checkpoint of a finished run in ``workdir``.

    ``field`` names the config field or flag the directory came from, for the errors;
    ``task`` (a name) refuses runs of any other task.
    """
    if not workdir:
        raise ConfigError(f"{field} is empty; give the workdir of a trained run.")
    config = load_run_config(workdir, field)
    if task is not None and config.task != task:
        raise ConfigError(f"{field}={workdir!r} is a {config.task!r} run, not a {task!r} run.")
    run = build(config, mesh)
    try:
        state, step = checkpointing.restore_latest(
            workdir, run.restore_target, keep=config.train.keep_checkpoints
        )
    except FileNotFoundError as e:
        raise ConfigError(f"{field}={workdir!r} has no usable checkpoint; train it first.") from e
    run.restored_step = step
    return run, state["ema_params"]


def load_judge(workdir: str, mesh, batch_size: int, field: str = "config.eval.judge_workdir"):
    """The feature space of the sample metrics: a trained run whose task can embed images
    (``feature_extractor(params, batch_size)``, the clean classifier's), loaded and checked
    before anything compiles."""
    run, params = restore_run(workdir, mesh, field)
    if not hasattr(run, "feature_extractor"):
        raise ConfigError(
            f"{field}={workdir!r} is a {run.name!r} run, which has no feature space; train a "
            "clean classifier (configs/classifier.py:clean) there."
        )
    return run.feature_extractor(params, batch_size)
