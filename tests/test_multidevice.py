"""Several devices in one process (8 host CPU devices, in a subprocess): data parallel and
FSDP train as one device does, and a checkpoint moves between mesh shapes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import ROOT, write_fake_idx

pytestmark = pytest.mark.slow  # end-to-end: `make test-fast` skips it


def test_data_parallel_and_fsdp_match_one_device_across_mesh_shapes(tmp_path):
    data_dir = write_fake_idx(tmp_path / "data")
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
    }
    r = subprocess.run(
        [sys.executable, "-m", "tests.multidevice_worker", str(data_dir), str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    result = json.load(open(tmp_path / "result.json"))
    # Steps 3-4 on a (data 2, fsdp 4) mesh of 8 devices, resumed from the single-device
    # checkpoint of step 2: the single device's losses.
    one, mixed = result["one"], result["mixed"]
    assert len(one) == len(mixed) == 4
    np.testing.assert_allclose(mixed, one, rtol=2e-5)
    # Each device holds about a quarter of the state under fsdp 4 (small leaves stay
    # replicated), and XLA's buffer assignment says the same of the step's arguments.
    assert 0.25 <= result["fsdp_fraction"] < 0.35
    single, fsdp = result["memory"]
    assert fsdp["arguments"] < 0.5 * single["arguments"]  # state and the (replicated) data
    # The fsdp-4 checkpoint restores onto fsdp 8 (kernels split 8 ways) and onto 1 device.
    assert result["fsdp8_kernels"] > 5 and result["fsdp8_kernels_sharded"]
    assert result["restored_equal"]
    bad_batch, bad_accum, bad_fsdp = result["errors"]
    assert "config.train.batch_size=6 must be divisible by the number of devices (4)" in bad_batch
    assert "16 / config.train.grad_accum=4 = 4 images per micro-batch" in bad_accum
    assert "config.train.fsdp=3 must divide the number of devices (8)" in bad_fsdp
