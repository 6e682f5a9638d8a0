"""Entry point: flags -> config -> modes.<mode>.run(config, workdir).

python -m diffax_lab.main --config=configs/ddpm.py[:VARIANT] --workdir=DIR
    [--mode=train|sample|eval] [--config.section.field=value ...]
For --mode=sample and --mode=eval, --config may be left out: the run's DIR/config.json is
used, with any --config.* overrides (e.g. of the sample and eval sections) on top.
Multi-process (see diffax_lab/distributed.py and launch/): the same command on every
process, with --coordinator_address/--num_processes/--process_id where JAX cannot detect
the cluster itself. User mistakes are reported in one line with exit status 2.
"""

from __future__ import annotations

import logging as std_logging
import os
import sys

from absl import app, flags, logging

from diffax_lab import compilation, config_lib, distributed
from diffax_lab.errors import ConfigError, DataError, WorkdirError
from diffax_lab.modes import evaluate, sample, train

MODES = {"train": train, "sample": sample, "eval": evaluate}

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "Config file, with :variant (configs/ddpm.py:tiny).")
flags.DEFINE_string("workdir", None, "Directory for checkpoints, samples and metrics.")
flags.DEFINE_enum("mode", "train", ["train", "sample", "eval"], "What to run.")
flags.DEFINE_string(
    "jax_cache_dir",
    "",
    "Persistent compilation cache directory ('' = $DIFFAX_JAX_CACHE, else "
    "$XDG_CACHE_HOME/diffax_lab/jax; 'off' = none). See diffax_lab/compilation.py.",
)
flags.DEFINE_bool(
    "compilation_cache", True, "Persistent compilation cache (--nocompilation_cache: off)."
)
flags.DEFINE_enum(
    "distributed",
    "auto",
    ["auto", "yes", "no"],
    "jax.distributed.initialize: auto = when flags or the cluster (SLURM, Open MPI, TPU pod) "
    "show several processes.",
)
flags.DEFINE_string("coordinator_address", "", "HOST:PORT of process 0 (multi-process).")
flags.DEFINE_integer("num_processes", 0, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", -1, "This process's index (with --coordinator_address).")
flags.DEFINE_string("cpu_collectives", "", "CPU collectives for multi-process CPU runs: gloo.")
flags.DEFINE_integer("num_cpu_devices", 0, "Host CPU devices to expose (0 = JAX's default).")
OVERRIDE_PREFIX = "--config."


class _QuietLibraries(std_logging.Filter):
    """Keeps orbax's per-save INFO chatter out of the run's log (warnings still show)."""

    def filter(self, record):
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def split_overrides(argv):
    """(``{"train.num_steps": "5", ...}`` from --config.X=V, the other arguments)."""
    overrides, rest = {}, []
    args = iter(argv)
    for a in args:
        if a.startswith(OVERRIDE_PREFIX):
            key, eq, value = a[len(OVERRIDE_PREFIX) :].partition("=")
            if not eq:
                value = next(args, "")
            overrides[key] = value
        else:
            rest.append(a)
    return overrides, rest


def resolve_config(config_spec, workdir, mode, overrides):
    """The run's config: from --config, or (sample/eval) from the workdir's config.json."""
    if config_spec:
        config = config_lib.load_config(config_spec)
    elif mode in ("sample", "eval") and workdir:
        config = config_lib.load_run_config(os.path.abspath(workdir), "--workdir")
    else:
        raise ConfigError(
            "--config is required for --mode=train (e.g. --config=configs/ddpm.py:tiny); "
            "--mode=sample and --mode=eval read the workdir's config.json when it is left out."
        )
    return config_lib.apply_string_overrides(config, overrides)


def main(argv, overrides):
    del argv
    logging.get_absl_logger().addFilter(_QuietLibraries())  # orbax logs through absl too
    compilation.enable_persistent_cache(FLAGS.jax_cache_dir, enabled=FLAGS.compilation_cache)
    try:
        if not FLAGS.workdir:
            raise ConfigError("--workdir is required: the run's directory.")
        config = resolve_config(FLAGS.config, FLAGS.workdir, FLAGS.mode, overrides)
        compilation.configure_cpu_runtime(initialize_backend=False)  # before JAX's CPU client
        distributed.initialize(
            FLAGS.distributed,
            FLAGS.coordinator_address,
            FLAGS.num_processes,
            FLAGS.process_id,
            FLAGS.cpu_collectives,
            FLAGS.num_cpu_devices,
        )
        compilation.configure_cpu_runtime()  # the rest, now that the backend may be created
        MODES[FLAGS.mode].run(config, FLAGS.workdir)
    except (ConfigError, DataError, WorkdirError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)  # one line: what is wrong and the fix
        sys.exit(2)
    except FloatingPointError as e:  # NonFiniteError: the run diverged
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)


def run():
    overrides, argv = split_overrides(sys.argv)
    app.run(lambda a: main(a, overrides), argv=argv)


if __name__ == "__main__":
    run()
