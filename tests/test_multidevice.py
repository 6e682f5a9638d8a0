import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import ROOT, write_fake_idx

pytestmark = pytest.mark.slow  # end-to-end: `make test-fast` skips it


def test_four_devices_match_one_device(tmp_path):
    data_dir = write_fake_idx(tmp_path / "data")
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4",
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
    four, one = result["curves"]["4"], result["curves"]["1"]
    assert len(four) == len(one) == 4
    np.testing.assert_allclose(four, one, rtol=1e-5)
    assert (
        "config.train.batch_size=6 must be divisible by the number of devices (4)"
        in result["error"]
    )
