"""Gradient accumulation (train.grad_accum): the scanned micro-batches give the full
batch's gradient, a run with accumulation follows the run without it, and a batch that
does not split is refused before anything compiles."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax_lab.errors import ConfigError
from diffax_lab.modes import common, train
from diffax_lab.sharding import make_mesh, microbatch_sharded
from diffax_lab.tasks.base import accumulate, split_microbatches
from tests.test_tasks import toy_config


def test_microbatches_partition_the_batch():
    x = jnp.arange(12)
    parts = np.asarray(split_microbatches(x, 3))
    assert parts.shape == (3, 4)
    np.testing.assert_array_equal(np.sort(parts.ravel()), np.arange(12))  # each example once
    np.testing.assert_array_equal(parts[1], [1, 4, 7, 10])


def test_accumulated_gradient_equals_the_full_batch_gradient():
    # A per-example loss with its own parameters' curvature (not the toy's mean): the mean
    # over 4 micro-batches of 4 equals the mean over 16 up to float summation order.
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 5)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 16), jnp.int32)
    params = {"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32), "b": jnp.ones(3)}

    def loss_fn(p, x, y, keys):
        del keys
        logits = jnp.tanh(x @ p["w"] + p["b"])
        loss = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(x.shape[0]), y])
        return loss, {"logit_mean": jnp.mean(logits)}

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    keys = list(jax.random.split(jax.random.PRNGKey(0), 3))
    (loss, aux), grads = grad_fn(params, x, y, keys)
    micro = microbatch_sharded(make_mesh(1))
    (loss4, aux4), grads4 = jax.jit(lambda p: accumulate(grad_fn, p, x, y, keys, 4, micro))(params)
    np.testing.assert_allclose(loss4, loss, rtol=1e-6)
    np.testing.assert_allclose(aux4["logit_mean"], aux["logit_mean"], rtol=1e-6)
    for g, g4 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads4), strict=True):
        assert np.abs(np.asarray(g)).max() > 1e-3  # a gradient that could differ
        np.testing.assert_allclose(g4, g, rtol=1e-5, atol=1e-7)


def test_a_run_with_accumulation_follows_the_run_without(tmp_path, tiny_data):
    curves = {}
    for accum in (1, 4):
        config = toy_config(
            tiny_data,
            **{
                "train.num_steps": 4,
                "train.log_every": 1,
                "train.grad_accum": accum,
                "train.fault_nan_steps": (2,),  # the guard skips a step in both runs
                "optim.lr": 0.05,
            },
        )
        workdir = str(tmp_path / f"a{accum}")
        state = train.run(config, workdir)
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            curves[accum] = [json.loads(x) for x in f]
        curves[accum].append(jax.device_get(state))
    lines1, lines4 = curves[1][:-1], curves[4][:-1]
    assert [m["skipped"] for m in lines4] == [0.0, 0.0, 1.0, 0.0]
    np.testing.assert_allclose(
        [m.get("loss", np.nan) for m in lines4], [m.get("loss", np.nan) for m in lines1], rtol=1e-5
    )
    s1, s4 = curves[1][-1], curves[4][-1]
    for key in ("params", "ema_params"):
        for a, b in zip(jax.tree.leaves(s1[key]), jax.tree.leaves(s4[key]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train.grad_accum": 3}, r"batch_size=16 must be divisible by config.train.grad_accum=3"),
        ({"train.grad_accum": 0}, r"train.grad_accum"),
    ],
)
def test_a_batch_that_does_not_split_is_refused(tmp_path, tiny_data, overrides, message):
    config = toy_config(tiny_data, **overrides)
    with pytest.raises(ConfigError, match=message):
        common.prepare(config, str(tmp_path / "w"), "train")
