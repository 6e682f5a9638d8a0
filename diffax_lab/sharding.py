"""The one place that builds meshes and shardings: data parallel over a 1-D ``data`` axis.

Parameters, EMA and optimizer state are replicated; batches are split along their first
axis. No pmap: the train step is one ``jax.jit`` program and XLA inserts the all-reduce.
"""

from __future__ import annotations

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from diffax_lab.errors import ConfigError

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
    devices = jax.devices()
    n = len(devices) if not num_devices else num_devices
    if n > len(devices):
        raise ConfigError(
            f"config.train.num_devices={n} but only {len(devices)} devices are visible."
        )
    return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices[:n])


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh) -> NamedSharding:
    """Splits the leading (batch) axis over the devices."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_divides(batch_size: int, mesh, field: str = "train.batch_size") -> None:
    n = mesh.devices.size
    if batch_size % n:
        raise ConfigError(
            f"config.{field}={batch_size} must be divisible by the number of devices ({n}); "
            f"use a multiple of {n}, or set train.num_devices."
        )
