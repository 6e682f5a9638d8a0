"""Run in a subprocess with 4 host CPU devices (XLA_FLAGS set by the test)."""

import json
import os
import sys

import jax

from diffax_lab.errors import ConfigError
from diffax_lab.modes import train
from tests.helpers import SMALL_UNET, tiny_config


def main(data_dir, out_dir):
    assert jax.device_count() == 4, jax.devices()
    curves = {}
    for n in (4, 1):
        config = tiny_config(
            data_dir,
            **{
                "train.num_devices": n,
                "train.log_every": 1,
                "train.num_steps": 4,
                **SMALL_UNET,
            },
        )
        workdir = os.path.join(out_dir, f"dev{n}")
        train.run(config, workdir)
        curves[n] = [json.loads(x)["loss"] for x in open(os.path.join(workdir, "metrics.jsonl"))]
    bad = tiny_config(data_dir, **{"train.num_devices": 4, "train.batch_size": 6})
    try:
        train.run(bad, os.path.join(out_dir, "bad"))
        error = ""
    except ConfigError as e:
        error = str(e)
    json.dump({"curves": curves, "error": error}, open(os.path.join(out_dir, "result.json"), "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
