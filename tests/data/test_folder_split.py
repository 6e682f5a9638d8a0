"""Image folders: the test split is held out from training (test/ sub-folder or a fraction)."""

import os
import random

import numpy as np
import pytest
from PIL import Image

from diffax_lab import data
from diffax_lab.data import folder
from tests.helpers import load_config

SIZE = 8


def _write(path, value):
    """An 8x8 grey image whose pixel value identifies it."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((SIZE, SIZE), value, np.uint8)).save(path)


def _config(directory, test_fraction=None):
    config = load_config()
    config.data.source, config.data.dir = "folder", str(directory)
    config.data.image_size, config.data.channels, config.data.num_examples = SIZE, 1, 0
    if test_fraction is not None:
        config.data.test_fraction = test_fraction  # the lead adds this field to the configs
    return config.data


def _ids(images):
    """The identifying value of each image."""
    assert np.all(images == images[:, :1, :1]), "an image is not one grey level"
    return images[:, 0, 0, 0].tolist()


@pytest.fixture
def flat_folder(tmp_path):
    """40 images, 20 per class; value = 5 * index + 10 so that every image differs."""
    for i in range(40):
        _write(tmp_path / ("cats" if i < 20 else "dogs") / f"{i:02d}.png", 10 + 5 * i)
    return tmp_path


def test_test_split_without_test_folder_or_fraction_is_refused(flat_folder):
    config = _config(flat_folder)
    assert _ids(data.load_split(config, "train")[0]) == [10 + 5 * i for i in range(40)]
    with pytest.raises(data.DataError, match=r"no test/ sub-folder.*data\.test_fraction"):
        data.load_split(config, "test")


def test_held_out_fraction_is_disjoint_complete_and_deterministic(flat_folder):
    config = _config(flat_folder, test_fraction=0.25)
    train_x, train_y = data.load_split(config, "train")
    test_x, test_y = data.load_split(config, "test")
    train, test = _ids(train_x), _ids(test_x)
    assert len(test) == 10 and len(train) == 30
    assert not set(train) & set(test)
    assert sorted(train + test) == [10 + 5 * i for i in range(40)]
    # Labels follow the class folder in both splits.
    for ids, labels in ((train, train_y), (test, test_y)):
        np.testing.assert_array_equal(labels, [int(v >= 10 + 5 * 20) for v in ids])
    assert set(test_y.tolist()) == {0, 1}  # 10 of 40 hashed paths fall in both classes
    again = data.load_split(config, "test")[0]
    assert _ids(again) == test


def test_held_out_choice_is_order_free_and_stable_under_additions():
    paths = [f"class_{i % 3}/img_{i:04d}.png" for i in range(200)]
    mask = folder.held_out(paths, 0.1)
    assert mask.sum() == 20
    shuffled = paths[:]
    random.Random(0).shuffle(shuffled)
    test_set = {p for p, m in zip(paths, mask, strict=True) if m}
    shuffled_mask = folder.held_out(shuffled, 0.1)
    assert {p for p, m in zip(shuffled, shuffled_mask, strict=True) if m} == test_set
    # 20 more images: at most a few of the old test images move to train.
    grown = paths + [f"class_0/new_{i:04d}.png" for i in range(20)]
    grown_test = {p for p, m in zip(grown, folder.held_out(grown, 0.1), strict=True) if m}
    assert len(test_set - grown_test) <= 4, len(test_set - grown_test)
    assert not folder.held_out(paths, 0.0).any()


def test_train_and_test_subfolders(tmp_path):
    for i in range(3):
        _write(tmp_path / "train" / "cats" / f"{i}.png", 10 + i)
        _write(tmp_path / "train" / "dogs" / f"{i}.png", 100 + i)
    _write(tmp_path / "test" / "dogs" / "0.png", 200)  # only one class in test
    _write(tmp_path / "test" / "dogs" / "1.png", 201)
    config = _config(tmp_path)
    train_x, train_y = data.load_split(config, "train")
    test_x, test_y = data.load_split(config, "test")
    assert _ids(train_x) == [10, 11, 12, 100, 101, 102]
    np.testing.assert_array_equal(train_y, [0, 0, 0, 1, 1, 1])
    assert _ids(test_x) == [200, 201]
    np.testing.assert_array_equal(test_y, [1, 1])  # dogs is class 1 in both splits


def test_folder_split_errors_name_the_fix(tmp_path):
    _write(tmp_path / "test" / "0.png", 1)
    with pytest.raises(data.DataError, match="no train/"):
        data.load_split(_config(tmp_path), "train")
    _write(tmp_path / "train" / "0.png", 2)
    with pytest.raises(data.DataError, match=r"test/ sub-folder and data\.test_fraction=0\.2"):
        data.load_split(_config(tmp_path, test_fraction=0.2), "test")
    with pytest.raises(data.DataError, match=r"data\.test_fraction must be in \[0, 1\)"):
        data.load_split(_config(tmp_path, test_fraction=1.0), "train")
    with pytest.raises(data.DataError, match="'valid'"):
        data.load_split(_config(tmp_path), "valid")
