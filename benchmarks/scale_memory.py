"""Per-device memory of the compiled train step: replicated vs FSDP, and by the number of
gradient-accumulation micro-batches. Compiles only (nothing runs), on the host-platform
devices the flag asks for.

    python -m benchmarks.scale_memory --config=configs/ddpm.py --devices=8 \
        --settings=fsdp=1,fsdp=8,grad_accum=1,grad_accum=4 [--config.x.y=...]

A setting is ``fsdp=F`` (the batch at the config's batch_size) or ``grad_accum=A`` with
``micro_batch=M`` fixed (batch A x M), so that the program's own memory can be seen not to
grow with A. Prints one JSON line per setting: XLA's buffer assignment per device
(arguments = state + batch, temporaries, peak) in MiB, and the HLO text size.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Config file (with :variant).", lock_config=True)
flags.DEFINE_integer("devices", 8, "Host-platform (CPU) devices to simulate.")
flags.DEFINE_list("settings", ["fsdp=1", "fsdp=8"], "fsdp=F or grad_accum=A, one per line.")
flags.DEFINE_integer("micro_batch", 16, "Images per micro-batch of the grad_accum settings.")
FLAGS = flags.FLAGS


def measure(config, fsdp: int, grad_accum: int) -> dict:
    import jax

    from diffax_lab import sharding
    from diffax_lab.tasks import registry

    config.train.fsdp, config.train.grad_accum = fsdp, grad_accum
    mesh = sharding.make_mesh(FLAGS.devices, fsdp)
    task = registry.build(config, mesh)
    B = config.train.batch_size
    imgs = jax.ShapeDtypeStruct((B, *task.image_shape), "uint8", sharding=task.batch_sharding)
    labels = jax.ShapeDtypeStruct((B,), "int32", sharding=task.batch_sharding)
    lowered = task.make_train_step(B, gather_in_step=False).lower(task.restore_target, imgs, labels)
    stats = lowered.compile().memory_analysis()
    mib = 2**20
    return {
        "fsdp": fsdp,
        "grad_accum": grad_accum,
        "batch": B,
        "params_M": round(task.count_params() / 1e6, 2),
        "arguments_mib": round(stats.argument_size_in_bytes / mib, 2),
        "temporaries_mib": round(stats.temp_size_in_bytes / mib, 2),
        "peak_mib": round(getattr(stats, "peak_memory_in_bytes", 0) / mib, 2),
        "hlo_kchars": round(len(lowered.as_text()) / 1e3, 1),
    }


def main(argv):
    del argv
    for s in FLAGS.settings:
        name, value = s.split("=")
        config = FLAGS.config.copy_and_resolve_references()
        config.unlock()
        if name == "fsdp":
            row = measure(config, int(value), 1)
        else:
            config.train.batch_size = int(value) * FLAGS.micro_batch
            row = measure(config, 1, int(value))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    # The device count must be set before JAX starts.
    for a in sys.argv:
        if a.startswith("--devices="):
            os.environ["XLA_FLAGS"] = (
                os.environ.get("XLA_FLAGS", "")
                + f" --xla_force_host_platform_device_count={a.split('=')[1]}"
            )
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    app.run(main)
