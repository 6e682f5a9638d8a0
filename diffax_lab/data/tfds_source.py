"""Named datasets through tensorflow-datasets (the `tfds` extra), read once into numpy."""

from __future__ import annotations

import numpy as np

from diffax_lab.data.idx import DataError

TFDS_SPLIT = {"train": "train", "test": "test"}


def load_tfds_split(name: str, split: str, data_dir: str | None):
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(
            f"data.source='tfds' (dataset {name!r}) needs tensorflow-datasets: "
            "`pip install -e .[tfds]`; or use data.source='idx' with the Debian package "
            "dataset-fashion-mnist."
        ) from e
    try:
        ds = tfds.load(name, split=TFDS_SPLIT[split], data_dir=data_dir or None, batch_size=-1)
        ds = tfds.as_numpy(ds)
    except Exception as e:  # tfds raises many kinds; all mean "not there, cannot fetch"
        raise DataError(
            f"tfds could not load {name!r} split {split!r} (data_dir={data_dir!r}): {e}. "
            "Run once with network access (tfds downloads and prepares it), or copy the "
            "prepared data into data.dir."
        ) from e
    images = np.asarray(ds["image"], np.uint8)
    labels = np.asarray(ds.get("label", np.zeros(images.shape[0])), np.int32)
    return images, labels
