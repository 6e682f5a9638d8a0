"""Start-up decisions of diffax_lab.distributed (the two-process run is test_multihost)."""

import pytest

from diffax_lab import distributed


@pytest.mark.parametrize(
    "env,expected",
    [
        ({"SLURM_NTASKS": "4"}, "slurm"),
        ({"SLURM_NTASKS": "1"}, None),
        ({"OMPI_COMM_WORLD_SIZE": "2"}, "openmpi"),
        ({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, "tpu"),
        ({"TPU_WORKER_HOSTNAMES": "t0"}, None),
        ({}, None),
    ],
)
def test_cluster_detection(monkeypatch, env, expected):
    for k in (
        "SLURM_NTASKS",
        "SLURM_STEP_NUM_TASKS",
        "OMPI_COMM_WORLD_SIZE",
        "TPU_WORKER_HOSTNAMES",
    ):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert distributed.cluster_detected() == expected


def test_explicit_coordinator_needs_count_and_id(monkeypatch):
    monkeypatch.delenv("DIFFAX_NUM_PROCESSES", raising=False)
    monkeypatch.delenv("DIFFAX_PROCESS_ID", raising=False)
    with pytest.raises(ValueError, match=r"needs --num_processes and --process_id"):
        distributed.initialize("auto", "localhost:1234")
    with pytest.raises(ValueError, match=r"--process_id=3 must lie in \[0, 2\)"):
        distributed.initialize("auto", "localhost:1234", 2, 3)


def test_single_process_without_a_cluster_does_not_initialize(monkeypatch):
    for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(k, raising=False)
    called = []
    monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda *a: called.append(a))
    distributed.initialize("auto")
    distributed.initialize("no", "localhost:1", 2, 0)
    assert called == []
