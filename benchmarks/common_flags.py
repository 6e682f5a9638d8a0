"""Flags shared by the benchmarks that are read side by side (throughput.py, ours, and
diffusers_peer.py, the PyTorch peer): one definition, so both measure the same config at
the same forward batch and iteration count unless told otherwise. Also the one way a
benchmark reports its JSON result (``print_json``)."""

import json

from absl import flags
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
