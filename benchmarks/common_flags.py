"""Flags shared by the benchmarks that are read side by side (throughput.py, ours, and
diffusers_peer.py, the PyTorch peer): one definition, so both measure the same config at
the same forward batch and iteration count unless told otherwise. Also the one way a
benchmark reports its JSON result (``print_json``)."""

import json
import os

from absl import app, flags
from ml_collections import config_flags


def define_measurement_flags():
    config_flags.DEFINE_config_file(
        "config", None, "Config file (with :variant).", lock_config=True
    )
    flags.DEFINE_integer("forward_batch", 256, "Batch of the forward-pass measurement.")
    flags.DEFINE_integer("iters", 10, "Timed iterations after warm-up.")
    flags.mark_flag_as_required("config")


def print_json(result: dict, out: str = "", indent: int = 1) -> None:
    """Prints ``result`` as JSON and, when ``out`` names a file, writes the same text there."""
    text = json.dumps(result, indent=indent)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")


def check_choices(flag: str, given, known) -> None:
    """Refuses (absl ``UsageError``) any of ``given``, the values of list flag ``--flag``,
    that is not in ``known``, naming them and the choices."""
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise app.UsageError(f"--{flag}: unknown {unknown}; choose from {list(known)}.")


def define_runtime_flag():
    flags.DEFINE_bool(
        "lab_cpu_runtime",
        True,
        "Run XLA:CPU as the lab's entry points do (compilation.configure_cpu_runtime: "
        "programs on the calling thread, freed memory kept in the process); "
        "--nolab_cpu_runtime keeps JAX's and glibc's defaults. A process-wide setting: "
        "a PyTorch peer in the same process runs under it too.",
    )


def configure_runtime() -> dict:
    """``--lab_cpu_runtime`` carried out; call first in ``main``, before anything runs on
    JAX. Returns what was set, for the benchmark's JSON."""
    from diffax_lab import compilation

    if not flags.FLAGS.lab_cpu_runtime:
        os.environ[compilation.RUNTIME_ENV] = "off"
    return compilation.configure_cpu_runtime()


PEER_STEPS = ("full", "network")


def define_peer_step_flag():
    flags.DEFINE_enum(
        "peer_step",
        "full",
        PEER_STEPS,
        "The peer's train step: 'full' does the work of the lab's step (batch from uint8 "
        "images, noise, timesteps, add_noise, forward, backward, clip, AdamW, EMA); "
        "'network' only forward, backward, clip and AdamW on a fixed batch (the peer of "
        "docs/BENCHMARKS.md's earlier figures).",
    )
