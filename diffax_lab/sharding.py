"""The one place that builds meshes and shardings: a 2-D mesh ``(data, fsdp)``.

Batches are split along their first axis over both axes (every device sees its own rows).
With ``train.fsdp = 1`` (the default) parameters, EMA and optimizer state are replicated
and XLA all-reduces the gradients (data parallel). With ``train.fsdp = F > 1`` each leaf
large enough to matter is split F ways along its largest dimension divisible by F (fully
sharded data parallel, ZeRO-3): XLA all-gathers a layer's weights where the step uses them
and reduce-scatters its gradients, so each device stores 1/F of the state. No pmap: the
train step is one ``jax.jit`` program and these shardings are all it is told.
"""

from __future__ import annotations

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from diffax_lab.errors import ConfigError

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # the batch is split over every device
# Leaves with fewer elements stay replicated under FSDP (biases, norms, embeddings of
# a few classes): splitting them saves nothing and costs a collective each.
MIN_SHARDED_SIZE = 2**10


def make_mesh(num_devices: int | None = None, fsdp: int = 1) -> jax.sharding.Mesh:
    """A (data, fsdp) mesh over the first ``num_devices`` devices (all when None/0)."""
    devices = jax.devices()
    n = len(devices) if not num_devices else num_devices
    if n > len(devices):
        raise ConfigError(
            f"config.train.num_devices={n} but only {len(devices)} devices are visible."
        )
    if fsdp < 1 or n % fsdp:
        raise ConfigError(
            f"config.train.fsdp={fsdp} must divide the number of devices ({n}); "
            f"use one of {[d for d in range(1, n + 1) if n % d == 0]}."
        )
    return jax.make_mesh(
        (n // fsdp, fsdp),
        BATCH_AXES,
        axis_types=(AxisType.Auto, AxisType.Auto),
        devices=devices[:n],
    )


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh) -> NamedSharding:
    """Splits the leading (batch) axis over all devices of the mesh."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def microbatch_sharded(mesh) -> NamedSharding:
    """[micro-batches, B / micro-batches, ...]: each micro-batch split over all devices."""
    return NamedSharding(mesh, PartitionSpec(None, BATCH_AXES))


def fsdp_spec(shape, fsdp: int, min_size: int = MIN_SHARDED_SIZE) -> PartitionSpec:
    """The leaf's PartitionSpec: its largest dimension divisible by ``fsdp`` split over the
    fsdp axis (ties: the last such dimension, a kernel's output channels), or replicated
    when it is small or no dimension divides."""
    size = 1
    for d in shape:
        size *= d
    if fsdp == 1 or size < min_size:
        return PartitionSpec()
    candidates = [i for i, d in enumerate(shape) if d % fsdp == 0]
    if not candidates:
        return PartitionSpec()
    axis = max(candidates, key=lambda i: (shape[i], i))
    return PartitionSpec(*([None] * axis), FSDP_AXIS)


def state_shardings(abstract_state, mesh):
    """Shardings of a train state from its abstract form (``jax.eval_shape``): replicated
    when the mesh has no fsdp axis to speak of, else ``fsdp_spec`` per leaf."""
    fsdp = mesh.shape[FSDP_AXIS]
    return jax.tree.map(
        lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp)), abstract_state
    )


def check_batch_divides(
    batch_size: int, mesh, field: str = "train.batch_size", grad_accum: int = 1
) -> None:
    """Every micro-batch (batch_size / grad_accum) must split evenly over the devices."""
    n = mesh.devices.size
    if batch_size % grad_accum:
        raise ConfigError(
            f"config.{field}={batch_size} must be divisible by config.train.grad_accum="
            f"{grad_accum} (the number of micro-batches); use a multiple of {grad_accum}."
        )
    micro = batch_size // grad_accum
    if micro % n:
        if grad_accum == 1:
            raise ConfigError(
                f"config.{field}={batch_size} must be divisible by the number of devices "
                f"({n}); use a multiple of {n}, or set train.num_devices."
            )
        raise ConfigError(
            f"config.{field}={batch_size} / config.train.grad_accum={grad_accum} = {micro} "
            f"images per micro-batch must be divisible by the number of devices ({n}); "
            f"use a batch_size that is a multiple of {n * grad_accum}, or a smaller grad_accum."
        )
