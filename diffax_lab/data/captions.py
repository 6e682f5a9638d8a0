"""Captions for text conditioning and CLIP: class-name templates, and the CelebA recipe.

- ``class_captions(labels, class_names, templates, key)``: one caption per labelled image,
  "a photo of a {class}" and other templates, the template drawn per image.
- CelebA (the DLI course's Part 5 recipe): ``read_celeba_attributes`` parses
  ``list_attr_celeba.txt`` (a count line, a header of attribute names, then
  ``filename v1 v2 ...`` with v in {1, -1}); ``celeba_prompt`` turns one row into
  "Photo of person bushy eyebrows, beard, wearing hat" (the attributes present, lower case,
  with ``No_Beard = -1`` read as "beard"); ``load_celeba`` reads the images named in the
  table from a folder, crops the largest centred square, resizes to 64x64 and returns them
  with their prompts.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from diffax_lab.data.idx import DataError

FASHION_MNIST_CLASSES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
TEMPLATES = (
    "a photo of a {}",
    "a picture of a {}",
    "a black and white photo of a {}",
    "a low resolution photo of a {}",
    "a photo of the {}",
)


def class_captions(labels, class_names=FASHION_MNIST_CLASSES, templates=TEMPLATES, seed=0):
    """A caption per label: a template (drawn per image from ``seed``) filled with its class."""
    rng = np.random.default_rng(seed)
    which = rng.integers(0, len(templates), len(labels))
    return [templates[w].format(class_names[int(y)]) for w, y in zip(which, labels, strict=True)]


def read_celeba_attributes(path: str):
    """(filenames, attribute names, int8 matrix [N, A] of 1 / -1) from list_attr_celeba.txt."""
    try:
        with open(path) as f:
            lines = [ln.strip() for ln in f if ln.strip()]
        count = int(lines[0])
        names = lines[1].split()
        rows = [ln.split() for ln in lines[2:]]
    except (OSError, ValueError, IndexError) as e:
        raise DataError(
            f"{path} is not a CelebA attribute table (a count line, a header of names, then "
            f"'filename 1 -1 ...' rows): {e}"
        ) from e
    bad = [r[0] for r in rows if len(r) != len(names) + 1]
    if len(rows) != count or bad:
        raise DataError(
            f"{path}: the header says {count} rows of {len(names)} attributes, found "
            f"{len(rows)} rows{f'; malformed: {bad[:3]}' if bad else ''}."
        )
    values = np.array([[int(v) for v in r[1:]] for r in rows], np.int8)
    return [r[0] for r in rows], names, values


def celeba_prompt(values, names) -> str:
    """'Photo of person <attributes present>' from one row of the attribute table."""
    words = []
    for v, name in zip(values, names, strict=True):
        if name == "No_Beard":
            if v < 0:
                words.append("beard")
        elif v > 0:
            words.append(name.replace("_", " ").lower())
    return "Photo of person " + ", ".join(words) if words else "Photo of person"


def crop_square_resize(img: Image.Image, size: int) -> np.ndarray:
    """The largest centred square, resized to size x size, as uint8 RGB [size, size, 3]."""
    img = img.convert("RGB")
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    img = img.crop((left, top, left + s, top + s)).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, np.uint8)


def load_celeba(image_dir: str, attr_file: str, size: int = 64, limit: int = 0):
    """(uint8 images [N, size, size, 3], prompts) of the images the table names."""
    files, names, values = read_celeba_attributes(attr_file)
    if limit:
        files, values = files[:limit], values[:limit]
    missing = [f for f in files if not os.path.exists(os.path.join(image_dir, f))]
    if missing:
        raise DataError(
            f"{len(missing)} images named in {attr_file} are not in {image_dir} "
            f"(first: {missing[0]}); point data.dir at the img_align_celeba folder."
        )
    images = np.stack(
        [crop_square_resize(Image.open(os.path.join(image_dir, f)), size) for f in files]
    )
    return images, [celeba_prompt(v, names) for v in values]
