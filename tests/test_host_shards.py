"""Host-sharded input (data.num_shards): shards are disjoint and complete, a process reads
only its own, the batch order depends on (seed, step, num_shards) and not on how many
processes read, and one shard is the single global order of before."""

import json
import os

import jax
import numpy as np
import pytest

from diffax_lab.data import load_split, pipeline
from diffax_lab.errors import ConfigError
from diffax_lab.modes import train
from diffax_lab.sharding import make_mesh
from diffax_lab.tasks import registry
from tests.test_tasks import toy_config


@pytest.mark.parametrize("n, k", [(64, 2), (10, 3), (7, 7), (100, 8)])
def test_shards_are_disjoint_and_complete(n, k):
    ranges = pipeline.shard_ranges(n, k)
    assert len(ranges) == k and ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges[:-1], ranges[1:], strict=True))  # contiguous
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= 1


def test_one_shard_is_the_global_order_and_shards_keep_to_their_examples():
    key = jax.random.PRNGKey(3)
    sharded = jax.jit(pipeline.sharded_batch_indices, static_argnums=(2, 3))
    plain = jax.jit(pipeline.batch_indices, static_argnums=(2, 3))
    for step in (0, 5, 9):
        np.testing.assert_array_equal(sharded(key, step, (20,), 8), plain(key, step, 20, 8))
    sizes = (10, 11)  # shard 1 holds examples 10..20
    seen = [np.asarray(sharded(key, s, sizes, 4)) for s in range(5)]
    first, second = np.concatenate([x[:2] for x in seen]), np.concatenate([x[2:] for x in seen])
    # An epoch of shard 0 (5 steps of 2) visits each of its 10 examples exactly once.
    np.testing.assert_array_equal(np.sort(first), np.arange(10))
    assert second.min() >= 10 and second.max() < 21 and len(set(second)) == 10


def test_a_process_reads_only_its_shards(tiny_data, monkeypatch):
    config = toy_config(tiny_data, **{"data.num_shards": 4})
    full, full_labels = load_split(config.data, "train")
    held = []
    for p in range(2):  # what each of two processes would read
        monkeypatch.setattr(jax, "process_count", lambda: 2)
        monkeypatch.setattr(jax, "process_index", lambda p=p: p)
        task = registry.build(config, make_mesh(1))
        imgs, labels = task.load_train_split()
        assert task.shard_sizes == (16, 16, 16, 16)
        np.testing.assert_array_equal(imgs, full[task.local_offset : task.local_offset + 32])
        np.testing.assert_array_equal(labels, full_labels[task.local_offset :][:32])
        held.append(task.local_offset)
    assert held == [0, 32]  # disjoint halves that together make the split


def test_host_and_device_placement_draw_the_same_sharded_batches(tmp_path, tiny_data):
    curves = {}
    for placement in ("device", "host"):
        config = toy_config(
            tiny_data,
            **{
                "data.num_shards": 2,
                "data.placement": placement,
                "train.num_steps": 3,
                "train.log_every": 1,
                "optim.lr": 0.05,
            },
        )
        train.run(config, str(tmp_path / placement))
        with open(os.path.join(tmp_path / placement, "metrics.jsonl")) as f:
            curves[placement] = [json.loads(x)["loss"] for x in f]
    assert curves["host"] == curves["device"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"data.num_shards": 3}, r"batch_size=16 must be divisible by config.data.num_shards=3"),
        ({"data.num_shards": 4, "data.num_examples": 12}, r"shards of 3, fewer than the"),
    ],
)
def test_shards_that_do_not_fit_the_batch_are_refused(tmp_path, tiny_data, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train.run(toy_config(tiny_data, **overrides), str(tmp_path / "w"))
