"""Shared test helpers: tiny configs and small IDX datasets written by the tests themselves."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from diffax_lab import config_lib
from diffax_lab.data.idx import write_idx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def load_config(name="ddpm.py", arg="tiny"):
    return config_lib.load_config(f"{name}:{arg or ''}")


def write_fake_idx(directory, n_train=64, n_test=32, size=28, gz=True, seed=0):
    """Blobby 28x28 'garments': a bright rectangle whose size depends on the label."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    ext = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = np.zeros((n, size, size), np.uint8)
        for i, y in enumerate(labels):
            h = 6 + int(y)
            images[i, 14 - h // 2 : 14 + h // 2, 8:20] = 200 + rng.integers(0, 55)
        write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte{ext}"), images)
        write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte{ext}"), labels)
    return directory


# A one-level U-Net without attention: enough for the tests that ask a question of the
# training loop (sharding, multiple processes), not of the network, at less compile time.
SMALL_UNET = {"model.channel_mult": (1,), "model.attention_resolutions": ()}


def tiny_config(data_dir, **overrides):
    config = load_config()
    config.data.dir = str(data_dir)
    config.data.num_examples = 0
    config.train.sample_every = 0
    return config_lib.apply_overrides(config, overrides)


def run_cli(args, env_extra=None, timeout=300):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env_extra or {})}
    cache = env.get("DIFFAX_JAX_CACHE", os.path.join(ROOT, ".jax_cache"))
    cmd = [sys.executable, "-m", "diffax_lab.main", f"--jax_cache_dir={cache}", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def start_cli(args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cache = env.get("DIFFAX_JAX_CACHE", os.path.join(ROOT, ".jax_cache"))
    cmd = [sys.executable, "-m", "diffax_lab.main", f"--jax_cache_dir={cache}", *args]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for_metrics(workdir, proc, min_step=1, timeout=240):
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended early: {proc.communicate()[1][-2000:]}")
        if os.path.exists(path):
            with open(path) as f:
                steps = [json.loads(x)["step"] for x in f if x.strip()]
            if steps and max(steps) >= min_step:
                return
        time.sleep(0.05)
    proc.kill()
    pytest.fail("no training step within the timeout")


def conv_matches_nn_conv(kwargs: dict, impl: str) -> str:
    """Checks that ``layers.Conv(impl=impl, **kwargs)`` has nn.Conv's parameters and gives
    its outputs and gradients (parameters and input) on one input; returns the StableHLO
    text of our side's jitted outputs and gradients, for checks of what it runs."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from diffax_lab.models.layers import Conv

    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9, 8, 3)), jnp.float32)
    ref, ours = nn.Conv(**kwargs), Conv(impl=impl, **kwargs)
    params = ref.init(jax.random.PRNGKey(1), x)
    ours_params = ours.init(jax.random.PRNGKey(1), x)
    assert jax.tree.structure(params) == jax.tree.structure(ours_params)
    jax.tree.map(np.testing.assert_array_equal, params, ours_params)

    def outputs_and_grads(m):
        loss = lambda p, x: (m.apply(p, x) ** 2).sum()  # noqa: E731
        return jax.jit(lambda p, x: (m.apply(p, x), jax.grad(loss, argnums=(0, 1))(p, x)))

    (y_ref, g_ref), (y, g) = outputs_and_grads(ref)(params, x), outputs_and_grads(ours)(params, x)
    assert y.shape == y_ref.shape
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), g_ref, g)
    return outputs_and_grads(ours).lower(params, x).as_text()
