"""Entry point: flags -> config -> run(mode).

python -m diffax_lab.main --config=configs/ddpm.py --workdir=DIR [--mode=train|sample|eval]
    [--config.section.field=value ...]
Multi-process (see diffax_lab/distributed.py and launch/): the same command on every
process, with --coordinator_address/--num_processes/--process_id where JAX cannot detect
the cluster itself.
"""

from __future__ import annotations

import logging as std_logging
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from diffax_lab import distributed
from diffax_lab.data import DataError
from diffax_lab.validation import ConfigError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (with :variant).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, samples and metrics.")
flags.DEFINE_enum("mode", "train", ["train", "sample", "eval"], "What to run.")
flags.DEFINE_string("jax_cache_dir", "", "Persistent compilation cache ('' = off).")
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
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(std_logging.Filter):
    """Keeps orbax's per-save INFO chatter out of the run's log (warnings still show)."""

    def filter(self, record):
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
    del argv
    logging.get_absl_logger().addFilter(_QuietLibraries())  # orbax logs through absl too
    if FLAGS.jax_cache_dir:
        jax.config.update("jax_compilation_cache_dir", FLAGS.jax_cache_dir)
    try:
        distributed.initialize(
            FLAGS.distributed,
            FLAGS.coordinator_address,
            FLAGS.num_processes,
            FLAGS.process_id,
            FLAGS.cpu_collectives,
            FLAGS.num_cpu_devices,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    from diffax_lab import evaluate, sampling, train

    run = {"train": train.train, "sample": sampling.sample, "eval": evaluate.evaluate}[FLAGS.mode]
    try:
        run(FLAGS.config, FLAGS.workdir)
    except (ConfigError, DataError, FileNotFoundError) as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as e:  # train.NonFiniteError: the run diverged
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    app.run(main)
