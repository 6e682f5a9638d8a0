"""Entry point: flags -> config -> run(mode).

python -m diffax_lab.main --config=configs/ddpm.py --workdir=DIR [--mode=train|sample|eval]
    [--config.section.field=value ...]
"""

from __future__ import annotations

import logging as std_logging
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from diffax_lab.data import DataError
from diffax_lab.validation import ConfigError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (with :variant).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, samples and metrics.")
flags.DEFINE_enum("mode", "train", ["train", "sample", "eval"], "What to run.")
flags.DEFINE_string("jax_cache_dir", "", "Persistent compilation cache ('' = off).")
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
