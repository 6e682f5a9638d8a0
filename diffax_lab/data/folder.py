"""A folder of images (PNG, JPEG, ...), optionally one sub-folder per class, read with Pillow.

Two layouts give a held-out test split:

- ``data.dir/train/`` and ``data.dir/test/`` (each with optional class sub-folders): the
  split is the sub-folder;
- one folder, no ``test/`` sub-folder: ``data.test_fraction`` of its images are held out
  for ``test``, chosen by a hash of each image's path relative to the folder, so the choice
  is the same on every run and machine, train and test are disjoint and together are the
  whole folder, and adding images moves few of the others between splits. A lone
  ``train/`` sub-folder (no ``test/``) is that folder.

Not for captions (``captions.py``) or for resizing to the model's size (``fit_to_size``).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
from PIL import Image

from diffax_lab.data.idx import DataError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
SPLITS = ("train", "test")


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    return img.resize((size, size), Image.Resampling.BICUBIC) if side != size else img


def list_images(root: str) -> list[str]:
    """Paths of the images under ``root``, relative to it with '/' separators, sorted."""
    files = []
    for dirpath, _, names in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for n in names:
            if n.lower().endswith(EXTENSIONS):
                files.append(n if rel == "." else f"{rel}/{n}".replace(os.sep, "/"))
    return sorted(files)


def _class_of(rel_path: str) -> str:
    """The class of an image: its folder relative to the split's root ('' for none)."""
    return rel_path.rpartition("/")[0]


def path_hash(rel_path: str) -> int:
    """A 64-bit hash of a relative path, the same on every run, machine and Python."""
    return int.from_bytes(hashlib.sha256(rel_path.encode("utf-8")).digest()[:8], "big")


def held_out(rel_paths: list[str], test_fraction: float) -> np.ndarray:
    """bool [N]: which images form the test split for ``test_fraction`` of them.

    The round(test_fraction * N) images with the smallest ``path_hash`` (at least one and
    at most N - 1 when test_fraction > 0): a deterministic, order-free choice.
    """
    n = len(rel_paths)
    if test_fraction <= 0.0:
        return np.zeros(n, bool)
    num_test = min(max(int(round(test_fraction * n)), 1), n - 1)
    order = np.argsort(np.asarray([path_hash(p) for p in rel_paths], np.uint64), kind="stable")
    mask = np.zeros(n, bool)
    mask[order[:num_test]] = True
    return mask


def _read(path: str, image_size: int, mode: str) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return np.asarray(center_crop_resize(img.convert(mode), image_size))
    except OSError as e:
        raise DataError(f"Cannot read image {path}: {e}") from e


def load_image_folder(
    directory: str,
    image_size: int,
    channels: int,
    split: str = "train",
    test_fraction=0.0,
    examples: tuple[int, int] | None = None,
):
    """Images uint8 [N, S, S, C] (centre-cropped, resized) and int32 labels [N] of ``split``.

    Labels come from class sub-folders, in sorted order over both splits (so a class has
    the same label in train and test); images with no class folder get label 0. See the
    module docstring for how the split is chosen. ``examples=(start, stop)``: only those
    images of the split (in its sorted order) are read (a host's shard).
    """
    roots, files = split_files(directory, split, test_fraction)
    classes = sorted({_class_of(f) for s in SPLITS for f in files[s]} - {""})
    class_id = {c: i for i, c in enumerate(classes)}
    mode = {1: "L", 3: "RGB"}[channels]
    chosen = files[split] if examples is None else files[split][examples[0] : examples[1]]
    images = [_read(os.path.join(roots[split], f), image_size, mode) for f in chosen]
    labels = [class_id.get(_class_of(f), 0) for f in chosen]
    images = np.stack(images).reshape(len(images), image_size, image_size, channels)
    return images, np.asarray(labels, np.int32)


def split_files(directory: str, split: str, test_fraction=0.0):
    """(root folder per split, relative image paths per split), checked."""
    if split not in SPLITS:
        raise DataError(f"An image folder has splits {SPLITS}, not {split!r}.")
    if not 0.0 <= test_fraction < 1.0:
        raise DataError(f"data.test_fraction must be in [0, 1), got {test_fraction}.")
    if not os.path.isdir(directory):
        raise DataError(f"data.dir {directory!r} (an image folder) does not exist.")
    has_test_dir = os.path.isdir(os.path.join(directory, "test"))
    if has_test_dir:
        if test_fraction > 0.0:
            raise DataError(
                f"data.dir {directory!r} has a test/ sub-folder and data.test_fraction="
                f"{test_fraction} also asks to hold out images: set data.test_fraction=0 "
                "to use test/, or remove test/ to hold out a fraction."
            )
        if not os.path.isdir(os.path.join(directory, "train")):
            raise DataError(
                f"data.dir {directory!r} has a test/ sub-folder but no train/ one: put the "
                "training images in train/ beside test/."
            )
        roots = {s: os.path.join(directory, s) for s in SPLITS}
        files = {s: list_images(roots[s]) for s in SPLITS}
    else:
        if split == "test" and test_fraction == 0.0:
            raise DataError(
                f"data.dir {directory!r} (an image folder) has no test/ sub-folder and "
                "data.test_fraction is 0, so it has no held-out test split. Either put "
                f"the test images in {os.path.join(directory, 'test')}/ and the training "
                f"images in {os.path.join(directory, 'train')}/, or set data.test_fraction "
                "(e.g. 0.1) to hold out that fraction of the images."
            )
        train_dir = os.path.join(directory, "train")
        root = train_dir if os.path.isdir(train_dir) else directory
        roots = {s: root for s in SPLITS}
        everything = list_images(root)
        is_test = held_out(everything, test_fraction)
        files = {
            "train": [f for f, t in zip(everything, is_test, strict=True) if not t],
            "test": [f for f, t in zip(everything, is_test, strict=True) if t],
        }
    if not files[split]:
        raise DataError(
            f"No images ({', '.join(EXTENSIONS)}) for split {split!r} under "
            f"data.dir {roots[split]!r}."
        )
    return roots, files
