"""Two processes on loopback (gloo CPU collectives), two CPU devices each, train exactly
as one process with four devices and the same global batch. The input is host-sharded
(data.num_shards=2): each process reads only its half of the train split, and the batch
order, a function of (seed, step, num_shards), is the one process's order."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from diffax_lab import checkpointing
from diffax_lab.sharding import make_mesh
from diffax_lab.tasks import registry
from tests.helpers import ROOT, SMALL_UNET, tiny_config, write_fake_idx

pytestmark = pytest.mark.slow  # end-to-end: `make test-fast` skips it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def cli(args, extra):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cache = env.get("DIFFAX_JAX_CACHE", os.path.join(ROOT, ".jax_cache"))
    cmd = [sys.executable, "-m", "diffax_lab.main", f"--jax_cache_dir={cache}", *args, *extra]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def final_state(config, workdir):
    exp = registry.build(config, make_mesh(1))
    ckpt = checkpointing.Checkpointer(workdir)
    state, step = ckpt.restore_latest_good(exp.restore_target)
    ckpt.close()
    assert step == config.train.num_steps
    return jax.device_get(state)


def test_two_processes_match_one_process_with_four_devices(tmp_path):
    data_dir = write_fake_idx(tmp_path / "data")
    common = [
        "--config=configs/ddpm.py:tiny",
        f"--config.data.dir={data_dir}",
        "--config.data.num_examples=0",
        "--config.data.placement=host",  # each process gathers its own slice of the batch
        "--config.data.num_shards=2",  # ... from the half of the data it alone reads
        "--config.train.sample_every=0",
        "--config.train.log_every=1",
        *(f"--config.{k}={v!r}" for k, v in SMALL_UNET.items()),
    ]
    one = cli([*common, f"--workdir={tmp_path / 'one'}"], ["--num_cpu_devices=4"])
    _, err = one.communicate(timeout=600)
    assert one.returncode == 0, err[-3000:]

    port = free_port()
    procs = [
        cli(
            [*common, f"--workdir={tmp_path / 'two'}"],
            [
                f"--coordinator_address=localhost:{port}",
                "--num_processes=2",
                f"--process_id={i}",
                "--cpu_collectives=gloo",
                "--num_cpu_devices=2",
            ],
        )
        for i in range(2)
    ]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    for p, e in zip(procs, errs, strict=True):
        assert p.returncode == 0, e[-3000:]
    assert "process 0 of 2" in errs[0] and "process 1 of 2" in errs[1]
    # Each process read its own shard: disjoint, and together the whole split of 64.
    assert "Process 0 of 2 reads train examples [0, 32) of 64 (shards 0-0 of 2)" in errs[0]
    assert "Process 1 of 2 reads train examples [32, 64) of 64 (shards 1-1 of 2)" in errs[1]

    def losses(d):
        with open(tmp_path / d / "metrics.jsonl") as f:
            return [json.loads(x)["loss"] for x in f]

    np.testing.assert_allclose(losses("two"), losses("one"), rtol=1e-5)
    config = tiny_config(data_dir, **SMALL_UNET)
    a, b = final_state(config, str(tmp_path / "one")), final_state(config, str(tmp_path / "two"))
    for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"]), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
