"""Data sources -> uint8 arrays [N, H, W, C] and int32 labels [N], sized for the model.

Sources (``data.source``): ``idx`` (MNIST-format files; Fashion-MNIST from the Debian
package by default), ``tfds`` (tensorflow-datasets, the `tfds` extra) and ``folder``.
Scaling to [-1, 1], flips and batching happen on the device (``pipeline.py``).
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from diffax_lab.data.folder import load_image_folder, split_files
from diffax_lab.data.idx import DataError, idx_split_size, load_idx_split
from diffax_lab.data.tfds_source import load_tfds_split, tfds_split_size

SOURCES = ("idx", "tfds", "folder")
DEFAULT_IDX_DIRS = {"fashion_mnist": "/usr/share/datasets/fashion-mnist"}
DATA_DIR_ENV = "DIFFAX_DATA_DIR"

__all__ = [
    "DataError",
    "SOURCES",
    "fit_to_size",
    "load_split",
    "resolve_data_dir",
    "split_size",
]


def resolve_data_dir(data_config) -> str:
    """data.dir if set, else $DIFFAX_DATA_DIR, else the dataset's default (for idx)."""
    if data_config.dir:
        return data_config.dir
    if os.environ.get(DATA_DIR_ENV):
        return os.environ[DATA_DIR_ENV]
    if data_config.source == "idx":
        if data_config.name not in DEFAULT_IDX_DIRS:
            raise DataError(
                f"data.source='idx' has no default directory for data.name={data_config.name!r}; "
                f"set data.dir or ${DATA_DIR_ENV}."
            )
        return DEFAULT_IDX_DIRS[data_config.name]
    if data_config.source == "folder":
        raise DataError("data.source='folder' needs data.dir (or $DIFFAX_DATA_DIR).")
    return ""


def fit_to_size(images: np.ndarray, size: int) -> np.ndarray:
    """Pads smaller images with zeros (black) to size x size; resizes larger ones.

    Fashion-MNIST's 28x28 becomes 32x32 with a 2-pixel border, so every U-Net level divides.
    """
    n, h, w, c = images.shape
    if (h, w) == (size, size):
        return images
    if h <= size and w <= size:
        top, left = (size - h) // 2, (size - w) // 2
        return np.pad(images, ((0, 0), (top, size - h - top), (left, size - w - left), (0, 0)))
    out = np.empty((n, size, size, c), np.uint8)
    for i in range(n):
        img = Image.fromarray(images[i, ..., 0] if c == 1 else images[i])
        out[i] = np.asarray(img.resize((size, size), Image.Resampling.BICUBIC)).reshape(
            size, size, c
        )
    return out


def split_size(data_config, split: str) -> int:
    """Examples ``load_split`` returns for ``split`` (after data.num_examples), found
    without reading the images: what host-sharded input cuts into shards."""
    source = data_config.source
    if source not in SOURCES:
        raise DataError(f"data.source must be one of {SOURCES}, got {source!r}.")
    directory = resolve_data_dir(data_config)
    if source == "idx":
        n = idx_split_size(directory, split)
    elif source == "tfds":
        n = tfds_split_size(data_config.name, split, directory)
    else:
        _, files = split_files(directory, split, float(data_config.get("test_fraction", 0.0)))
        n = len(files[split])
    return min(n, data_config.num_examples) if data_config.num_examples else n


def load_split(data_config, split: str, examples: tuple[int, int] | None = None):
    """Loads ``split`` (train or test) as uint8 [N, S, S, C] and int32 [N].

    For ``folder``, the test split is ``data.dir/test/`` or, without one, the
    ``data.test_fraction`` of the images held out from training (``folder.py``).
    ``examples=(start, stop)`` (within ``split_size``): only those examples, as a host
    of host-sharded input reads them; tfds and folders read nothing else, IDX files (one
    compressed stream) are read whole and cut.
    """
    source = data_config.source
    if source not in SOURCES:
        raise DataError(f"data.source must be one of {SOURCES}, got {source!r}.")
    directory = resolve_data_dir(data_config)
    if source == "idx":
        images, labels = load_idx_split(directory, split)
        if examples is not None:
            images = images[examples[0] : examples[1]].copy()  # frees the rest
            labels = labels[examples[0] : examples[1]].copy()
    elif source == "tfds":
        images, labels = load_tfds_split(data_config.name, split, directory, examples)
    else:
        images, labels = load_image_folder(
            directory,
            data_config.image_size,
            data_config.channels,
            split,
            test_fraction=float(data_config.get("test_fraction", 0.0)),
            examples=examples,
        )
    if images.shape[-1] != data_config.channels:
        raise DataError(
            f"data.channels={data_config.channels} but {source} data {data_config.name!r} "
            f"has {images.shape[-1]} channels."
        )
    if data_config.num_examples and examples is None:  # a range lies within it already
        images, labels = images[: data_config.num_examples], labels[: data_config.num_examples]
    return fit_to_size(images, data_config.image_size), labels
