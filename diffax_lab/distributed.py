"""Multi-process start-up: ``jax.distributed.initialize`` from flags, environment or the
cluster's own variables, before anything touches a device.

- Cloud TPU pods, SLURM and Open MPI: JAX detects coordinator, process count and id itself
  (``--distributed=auto`` initializes when the environment shows more than one process).
- Anything else (Kubernetes without JAX's detection, bare machines): pass
  ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` or set
  DIFFAX_COORDINATOR_ADDRESS, DIFFAX_NUM_PROCESSES, DIFFAX_PROCESS_ID.
- CPU-only clusters (and the tests): ``--cpu_collectives=gloo``.
Every process runs the same command; each feeds its own slice of the global batch, and
only process 0 writes logs, metrics, images and reports (orbax coordinates checkpoints).
"""

from __future__ import annotations

import os

import jax
from absl import logging

from diffax_lab.errors import ConfigError


def _env_int(name: str) -> int:
    try:
        return int(os.environ.get(name, "0"))
    except ValueError:
        return 0


def cluster_detected() -> str | None:
    """The kind of multi-process launch the environment shows, if any."""
    if _env_int("SLURM_NTASKS") > 1 or _env_int("SLURM_STEP_NUM_TASKS") > 1:
        return "slurm"
    if _env_int("OMPI_COMM_WORLD_SIZE") > 1:
        return "openmpi"
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if len([h for h in hosts.split(",") if h]) > 1:
        return "tpu"
    return None


def initialize(
    mode: str = "auto",
    coordinator_address: str = "",
    num_processes: int = 0,
    process_id: int = -1,
    cpu_collectives: str = "",
    num_cpu_devices: int = 0,
) -> None:
    """Sets up devices and, when asked or detected, the distributed runtime."""
    if num_cpu_devices:
        jax.config.update("jax_num_cpu_devices", num_cpu_devices)
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    coordinator_address = coordinator_address or os.environ.get("DIFFAX_COORDINATOR_ADDRESS", "")
    num_processes = num_processes or _env_int("DIFFAX_NUM_PROCESSES")
    if process_id < 0 and "DIFFAX_PROCESS_ID" in os.environ:
        process_id = _env_int("DIFFAX_PROCESS_ID")
    explicit = bool(coordinator_address)
    if explicit and (num_processes < 1 or process_id < 0):
        raise ConfigError(
            "--coordinator_address needs --num_processes and --process_id (or "
            "DIFFAX_NUM_PROCESSES and DIFFAX_PROCESS_ID)."
        )
    if explicit and not 0 <= process_id < num_processes:
        raise ConfigError(f"--process_id={process_id} must lie in [0, {num_processes}).")
    detected = cluster_detected()
    if mode == "no" or (mode == "auto" and not explicit and detected is None):
        return
    if explicit:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    else:
        jax.distributed.initialize()  # TPU, SLURM, Open MPI: detected by JAX
    logging.info(
        "Distributed: process %d of %d (%s); %d local and %d global devices.",
        jax.process_index(),
        jax.process_count(),
        "flags" if explicit else detected or "jax auto-detection",
        jax.local_device_count(),
        jax.device_count(),
    )


def is_main_process() -> bool:
    return jax.process_index() == 0
