"""IDX files (the MNIST / Fashion-MNIST format), plain or gzipped, read with numpy.

Format: a big-endian header of two zero bytes, a type code (0x08 = uint8), the number of
dimensions, then one uint32 size per dimension, then the data. Every size is checked
against the file's length, so a truncated or mislabelled file fails loudly here.
"""

from __future__ import annotations

import gzip
import os

import numpy as np

from diffax_lab.errors import DataError

GET_DATA_HINT = (
    "Get Fashion-MNIST with `apt-get install dataset-fashion-mnist` (files land in "
    "/usr/share/datasets/fashion-mnist), or point data.dir (or $DIFFAX_DATA_DIR) at a folder "
    "holding train-images-idx3-ubyte[.gz] and friends, or use data.source='tfds'."
)
SPLIT_PREFIX = {"train": "train", "test": "t10k"}


def read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # EOFError: a truncated .gz
        raise DataError(f"Cannot read IDX file {path}: {e}. {GET_DATA_HINT}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number). {GET_DATA_HINT}")
    if raw[2] != 0x08:
        raise DataError(f"{path}: IDX type code 0x{raw[2]:02x} is not uint8 (0x08).")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated inside its header. {GET_DATA_HINT}")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise DataError(
            f"{path} is truncated or corrupt: its header declares shape {shape} "
            f"({expected} bytes of data) but the file holds {len(raw) - header}. {GET_DATA_HINT}"
        )
    return np.frombuffer(raw, np.uint8, count=expected, offset=header).reshape(shape)


def idx_length(path: str) -> int:
    """The first dimension an IDX file's header declares (its number of examples)."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read(8)
    except (OSError, EOFError) as e:
        raise DataError(f"Cannot read IDX file {path}: {e}. {GET_DATA_HINT}") from e
    if len(raw) < 8 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number). {GET_DATA_HINT}")
    return int(np.frombuffer(raw, ">u4", count=1, offset=4)[0])


def idx_split_size(directory: str, split: str) -> int:
    if split not in SPLIT_PREFIX:
        raise DataError(f"IDX data has splits {sorted(SPLIT_PREFIX)}, not {split!r}.")
    return idx_length(find_idx_file(directory, f"{SPLIT_PREFIX[split]}-labels-idx1-ubyte"))


def find_idx_file(directory: str, stem: str) -> str:
    for name in (stem, stem + ".gz"):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    raise DataError(f"No {stem}[.gz] in {directory}. {GET_DATA_HINT}")


def load_idx_split(directory: str, split: str):
    """Images uint8 [N, H, W, 1] and labels int32 [N] of one split (train or test)."""
    if not os.path.isdir(directory):
        raise DataError(f"data.dir {directory!r} does not exist. {GET_DATA_HINT}")
    if split not in SPLIT_PREFIX:
        raise DataError(f"IDX data has splits {sorted(SPLIT_PREFIX)}, not {split!r}.")
    prefix = SPLIT_PREFIX[split]
    images = read_idx(find_idx_file(directory, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(find_idx_file(directory, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DataError(
            f"IDX files in {directory} disagree: images {images.shape}, labels {labels.shape}."
        )
    return images[..., None], labels.astype(np.int32)


def write_idx(path: str, array: np.ndarray) -> None:
    """Writes a uint8 array as IDX (gzipped if the path ends in .gz); tests make data with it."""
    array = np.ascontiguousarray(array, np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())
