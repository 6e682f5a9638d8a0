import gzip
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from diffax_lab import data
from diffax_lab.data import idx, pipeline
from tests.helpers import load_config, write_fake_idx


def test_idx_round_trip_plain_and_gz(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("a-idx3-ubyte", "a-idx3-ubyte.gz"):
        idx.write_idx(str(tmp_path / name), a)
        np.testing.assert_array_equal(idx.read_idx(str(tmp_path / name)), a)


def test_truncated_idx_names_the_file_and_the_fix(tmp_path):
    path = str(tmp_path / "train-images-idx3-ubyte")
    idx.write_idx(path, np.zeros((10, 28, 28), np.uint8))
    with open(path, "r+b") as f:
        f.truncate(16 + 28 * 28 * 5)
    with pytest.raises(
        idx.DataError, match=r"train-images-idx3-ubyte is truncated.*apt-get install"
    ):
        idx.read_idx(path)
    gz = str(tmp_path / "x.gz")
    with open(gz, "wb") as f:  # a gzip stream cut in half
        f.write(gzip.compress(b"\0\0\x08\x01" + b"\0\0\0\x10" + bytes(16))[:12])
    with pytest.raises(idx.DataError, match="x.gz"):
        idx.read_idx(gz)


def test_not_an_idx_file(tmp_path):
    path = tmp_path / "junk"
    path.write_bytes(b"hello world")
    with pytest.raises(idx.DataError, match="not an IDX file"):
        idx.read_idx(str(path))


def test_missing_directory_names_path_and_apt_package():
    with pytest.raises(idx.DataError, match=r"/no/such/dir.*dataset-fashion-mnist"):
        idx.load_idx_split("/no/such/dir", "train")


def test_load_split_pads_28_to_32(tmp_path):
    write_fake_idx(tmp_path, n_train=20, n_test=8)
    config = load_config()
    config.data.dir = str(tmp_path)
    config.data.num_examples = 0
    images, labels = data.load_split(config.data, "train")
    assert images.shape == (20, 32, 32, 1) and images.dtype == np.uint8
    assert labels.shape == (20,) and labels.dtype == np.int32
    assert np.all(images[:, :2] == 0) and np.all(images[:, :, -2:] == 0)  # the zero border
    test_images, _ = data.load_split(config.data, "test")
    assert test_images.shape == (8, 32, 32, 1)


def test_env_var_and_default_dir(tmp_path, monkeypatch):
    config = load_config()
    config.data.dir = ""
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    assert data.resolve_data_dir(config.data) == "/usr/share/datasets/fashion-mnist"
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    assert data.resolve_data_dir(config.data) == str(tmp_path)


def test_image_folder_with_classes(tmp_path):
    for cls, value in (("cats", 50), ("dogs", 200)):
        os.makedirs(tmp_path / cls)
        for i in range(3):
            Image.fromarray(np.full((40, 48, 3), value + i, np.uint8)).save(
                tmp_path / cls / f"{i}.png"
            )
    config = load_config()
    config.data.source, config.data.dir, config.data.channels = "folder", str(tmp_path), 3
    images, labels = data.load_split(config.data, "train")
    assert images.shape == (6, 32, 32, 3)
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 1])
    assert images[0].mean() == pytest.approx(50, abs=1) and images[-1].mean() == pytest.approx(
        202, abs=1
    )


def test_tfds_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails
    config = load_config("cifar10_ddpm.py", None)
    with pytest.raises(idx.DataError, match=r"pip install -e \.\[tfds\]"):
        data.load_split(config.data, "train")


def test_batches_are_epoch_permutations_and_pure():
    key = jax.random.PRNGKey(7)
    n, b = 50, 8  # batches straddle epoch boundaries
    fn = jax.jit(pipeline.batch_indices, static_argnums=(2, 3))
    seq = np.concatenate([np.asarray(fn(key, s, n, b)) for s in range(25)])  # 4 epochs
    for e in range(4):
        assert sorted(seq[e * n : (e + 1) * n]) == list(range(n))
    assert not np.array_equal(seq[:n], seq[n : 2 * n])  # a fresh order each epoch
    np.testing.assert_array_equal(np.asarray(fn(key, 13, n, b)), seq[13 * b : 14 * b])
    # Far-out steps do not overflow: still a valid batch of distinct indices.
    far = np.asarray(fn(key, 2_000_000_000 // b, n, b))
    assert far.min() >= 0 and far.max() < n


def test_uint8_range_round_trip():
    x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    y = pipeline.to_model_range(x)
    assert float(y.min()) == -1.0 and float(y.max()) == 1.0
    np.testing.assert_array_equal(np.asarray(pipeline.to_uint8(y)), x)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 65, 1000, 4097])
def test_shuffled_index_is_a_bijection_of_range_n(n):
    keys = pipeline.epoch_round_keys(jax.random.PRNGKey(0), 5)
    perm = np.asarray(pipeline.shuffled_index(keys, jnp.arange(n), n))
    np.testing.assert_array_equal(np.sort(perm), np.arange(n))


def test_shuffled_index_draws_every_permutation_about_equally_often():
    """Over 2,400 epochs every one of the 24 orders of 4 examples turns up, each within
    a loose band around 100 (a fixed or badly mixed shuffle would miss most of them)."""
    keys = pipeline.epoch_round_keys(jax.random.PRNGKey(1), jnp.arange(2400))
    perms = np.asarray(jax.vmap(lambda k: pipeline.shuffled_index(k, jnp.arange(4), 4))(keys))
    _, counts = np.unique(perms, axis=0, return_counts=True)
    assert len(counts) == 24 and counts.min() > 60 and counts.max() < 140
