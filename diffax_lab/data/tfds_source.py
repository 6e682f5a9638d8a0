"""Named datasets through tensorflow-datasets (the `tfds` extra), read once into numpy."""

from __future__ import annotations

import numpy as np

from diffax_lab.data.idx import DataError

TFDS_SPLIT = {"train": "train", "test": "test"}


def _tfds(name: str):
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(
            f"data.source='tfds' (dataset {name!r}) needs tensorflow-datasets: "
            "`pip install -e .[tfds]`; or use data.source='idx' with the Debian package "
            "dataset-fashion-mnist."
        ) from e
    return tfds


def tfds_split_size(name: str, split: str, data_dir: str | None) -> int:
    """Examples in the split, from the prepared dataset's metadata (nothing is read)."""
    tfds = _tfds(name)
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
        return int(builder.info.splits[TFDS_SPLIT[split]].num_examples)
    except Exception as e:
        raise DataError(
            f"tfds could not read the size of {name!r} split {split!r} (data_dir="
            f"{data_dir!r}): {e}. Prepare the dataset first (run once with network access)."
        ) from e


def load_tfds_split(
    name: str, split: str, data_dir: str | None, examples: tuple[int, int] | None = None
):
    """The split as numpy; ``examples=(start, stop)``: only that slice is read (tfds's
    ``split[start:stop]`` read instruction: a host reads only its shard)."""
    tfds = _tfds(name)
    spec = TFDS_SPLIT[split] + ("" if examples is None else f"[{examples[0]}:{examples[1]}]")
    try:
        ds = tfds.load(name, split=spec, data_dir=data_dir or None, batch_size=-1)
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
