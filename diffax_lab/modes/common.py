"""What every mode does before it loads data or compiles: check the config through its
task, the workdir and the devices; restore the newest checkpoint."""

from __future__ import annotations

import jax
from absl import logging

from diffax_lab import checkpointing, evaluators, sharding
from diffax_lab import workdir as workdir_lib
from diffax_lab.config_lib import read_saved
from diffax_lab.errors import ConfigError
from diffax_lab.tasks import registry


def check_optional_deps(config) -> None:
    if config.train.get("tensorboard", False):
        try:
            import tensorboardX  # noqa: F401
        except ImportError as e:
            raise ConfigError(
                "config.train.tensorboard=True needs tensorboardX: `pip install -e .[tensorboard]`."
            ) from e


def keep_decay_horizon(config, workdir: str) -> None:
    """Extending a finished cosine-decay run keeps the decay horizon it was trained with
    (raising train.num_steps would otherwise restart the decay from a higher lr)."""
    if config.optim.lr_schedule != "cosine" or config.optim.get("decay_steps", 0):
        return
    saved = read_saved(workdir) if workdir_lib.has_checkpoints(workdir) else None
    if not saved or saved.get("optim", {}).get("lr_schedule") != "cosine":
        return
    horizon = saved["optim"].get("decay_steps") or saved["train"]["num_steps"]
    if horizon != config.train.num_steps:
        logging.warning(
            "train.num_steps=%d extends a run whose cosine decay ends at step %d: keeping "
            "that horizon (the lr stays at its decayed value past it). To decay over another "
            "horizon, set --config.optim.decay_steps=N.",
            config.train.num_steps,
            horizon,
        )
        config.optim.decay_steps = horizon


def prepare(config, workdir: str, mode: str):
    """Every check that can fail, before any data is placed or anything compiles.

    Returns (absolute workdir, mesh, task). Nothing is written here (sample and eval find
    a workdir without checkpoints when they restore, and create nothing in it).
    """
    registry.check_config(config)
    check_optional_deps(config)
    workdir = workdir_lib.check_workdir(workdir)
    mesh = sharding.make_mesh(config.train.num_devices or None, config.train.get("fsdp", 1))
    if mode == "train":
        accum = config.train.get("grad_accum", 1)
        sharding.check_batch_divides(config.train.batch_size, mesh, grad_accum=accum)
        if config.train.batch_size % (jax.process_count() * accum):
            raise ConfigError(
                f"config.train.batch_size={config.train.batch_size} must be divisible by the "
                f"{jax.process_count()} processes x config.train.grad_accum={accum} (each "
                "process feeds batch_size / processes images, micro-batch by micro-batch)."
            )
        shards = config.data.get("num_shards", 0)
        if shards % jax.process_count():
            raise ConfigError(
                f"config.data.num_shards={shards} must be a multiple of the "
                f"{jax.process_count()} processes (each reads whole shards); use "
                f"{jax.process_count()} or a multiple, or 0 for every process to read all."
            )
        if shards and jax.process_count() > 1 and config.data.placement == "device":
            raise ConfigError(
                "config.data.num_shards with several processes needs "
                "config.data.placement='host' (no device holds the whole dataset)."
            )
        workdir_lib.check_resume_compatible(workdir, config)
        keep_decay_horizon(config, workdir)
    task = registry.build(config, mesh)
    if mode == "sample" and not task.can_sample:
        raise ConfigError(
            f"A {task.name} run has nothing to sample; use --mode=eval for its evaluation."
        )
    return workdir, mesh, task


def restore(task, workdir: str, step: int = 0):
    """(state, step) of the newest good checkpoint (or of ``step`` > 0)."""
    return checkpointing.restore_latest(
        workdir, task.restore_target, step, keep=task.config.train.keep_checkpoints
    )


def load_judge(config, mesh, metrics):
    """The judge's feature extractor when an evaluator needs one, else None."""
    if not evaluators.needs_judge(metrics):
        return None
    return registry.load_judge(config.eval.judge_workdir, mesh, config.eval.batch_size)


def build_evaluators(task, workdir: str, mesh, metrics) -> list:
    """The evaluators of ``metrics``, prepared (data, judge, checks) before compiling."""
    judge = load_judge(task.config, mesh, metrics)
    evals = evaluators.build(task, workdir, metrics, judge)
    for ev in evals:
        ev.prepare()
    return evals
