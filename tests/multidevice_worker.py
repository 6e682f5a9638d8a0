"""Run in a subprocess with 8 host CPU devices (XLA_FLAGS set by tests/test_multidevice.py).

One process, two short runs of the tiny diffusion config (two compiles, as before FSDP):
- ``one``: 1 device, steps 1-4 (the reference), saved at steps 2 and 4;
- ``fsdp``: a copy of ``one`` cut back to its step-2 checkpoint, resumed for steps 3-4 on
  all 8 devices as a (data 2, fsdp 4) mesh: batch split 8 ways, parameters and optimizer
  state 4 ways, restored from the single-device checkpoint;
then the final sharded checkpoint restored onto an fsdp 8 mesh and onto 1 device, and the
config errors, all written to result.json for the test to judge.
"""

import json
import logging
import os
import re
import shutil
import sys

import jax
import numpy as np
from absl import logging as absl_logging

from diffax_lab import checkpointing
from diffax_lab.errors import ConfigError
from diffax_lab.modes import train
from diffax_lab.sharding import FSDP_AXIS, make_mesh
from diffax_lab.tasks import registry
from tests.helpers import SMALL_UNET, tiny_config


class MemoryLog(logging.Handler):
    """Collects the per-device memory the train mode logs after compiling."""

    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        msg = record.getMessage()
        if "per device" in msg:
            self.lines.append({k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+) MiB", msg)})


def curve(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(x)["loss"] for x in f]


def run(data_dir, workdir, **overrides):
    config = tiny_config(data_dir, **{"train.log_every": 1, **SMALL_UNET, **overrides})
    return config, train.run(config, workdir)


def local_fraction(state):
    """Bytes one device holds / bytes of the whole state."""
    leaves = jax.tree.leaves(state)
    held = sum(x.addressable_shards[0].data.nbytes for x in leaves)
    return held / sum(x.nbytes for x in leaves)


def config_error(config, workdir):
    try:
        train.run(config, workdir)
    except ConfigError as e:
        return str(e)
    return ""


def main(data_dir, out_dir):
    assert jax.device_count() == 8, jax.devices()
    memory = MemoryLog()
    absl_logging.set_verbosity(absl_logging.INFO)
    logging.getLogger("absl").addHandler(memory)
    result = {}
    run(data_dir, os.path.join(out_dir, "one"), **{"train.num_devices": 1})
    result["one"] = curve(os.path.join(out_dir, "one"))

    # Cut a copy of the reference back to step 2 and resume it sharded.
    mixed = os.path.join(out_dir, "fsdp")
    shutil.copytree(os.path.join(out_dir, "one"), mixed)
    shutil.rmtree(os.path.join(mixed, "checkpoints", "4"))
    config, state = run(data_dir, mixed, **{"train.num_devices": 8, "train.fsdp": 4})
    result["mixed"] = curve(mixed)
    result["fsdp_fraction"] = local_fraction(state)
    result["memory"] = memory.lines  # [1 device, fsdp 4 on 8]

    # The fsdp-4 checkpoint onto an fsdp-8 mesh and onto one device: same values.
    restored = {}
    for name, mesh in (("fsdp8", make_mesh(8, 8)), ("single", make_mesh(1))):
        task = registry.build(config, mesh)
        ckpt = checkpointing.Checkpointer(mixed)
        got, step = ckpt.restore_latest_good(task.restore_target)
        ckpt.close()
        assert step == 4, step
        restored[name] = got
    kernels = [
        x for x in jax.tree.leaves(restored["fsdp8"]["params"]) if x.size >= 2**10 and x.ndim > 1
    ]
    result["fsdp8_kernels_sharded"] = all(FSDP_AXIS in x.sharding.spec for x in kernels)
    result["fsdp8_kernels"] = len(kernels)
    result["restored_equal"] = all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(
            jax.tree.leaves(restored["fsdp8"]),
            jax.tree.leaves(jax.device_get(state)),
            strict=True,
        )
    ) and all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(
            jax.tree.leaves(restored["single"]),
            jax.tree.leaves(jax.device_get(state)),
            strict=True,
        )
    )

    result["errors"] = [
        config_error(
            tiny_config(data_dir, **{"train.num_devices": 4, "train.batch_size": 6}),
            os.path.join(out_dir, "bad1"),
        ),
        config_error(
            tiny_config(data_dir, **{"train.num_devices": 8, "train.grad_accum": 4}),
            os.path.join(out_dir, "bad2"),
        ),
        config_error(
            tiny_config(data_dir, **{"train.num_devices": 8, "train.fsdp": 3}),
            os.path.join(out_dir, "bad3"),
        ),
    ]
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
