"""CelebA attribute prompts (the DLI course's attributes-to-faces recipe) from either source:

- tfds ``celeb_a``: each example's ``attributes`` is a dict of 40 booleans
  (``prompts_from_tfds``); the images are 218x178 (``square_crop`` takes the centred
  178x178 square before resizing, as the course does);
- the original layout (``img_align_celeba/*.jpg`` beside ``list_attr_celeba.txt``), which
  ``write_synthetic`` imitates for offline tests and ``read_attribute_table`` /
  ``prompts_from_folder`` read.

A prompt lists the attributes present in the table's order, lower case with spaces, with
``No_Beard = -1`` read as "beard" in No_Beard's place, after "Photo of person " and ending
with a full stop:
"Photo of person bushy eyebrows, mouth slightly open, beard, wearing hat." A row without
attributes is "Photo of person.".
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from diffax_lab.data.captions import read_celeba_attributes
from diffax_lab.data.idx import DataError

# The 40 attributes in the order of list_attr_celeba.txt (and of tfds celeb_a's features).
ATTRIBUTES = (
    "5_o_Clock_Shadow",
    "Arched_Eyebrows",
    "Attractive",
    "Bags_Under_Eyes",
    "Bald",
    "Bangs",
    "Big_Lips",
    "Big_Nose",
    "Black_Hair",
    "Blond_Hair",
    "Blurry",
    "Brown_Hair",
    "Bushy_Eyebrows",
    "Chubby",
    "Double_Chin",
    "Eyeglasses",
    "Goatee",
    "Gray_Hair",
    "Heavy_Makeup",
    "High_Cheekbones",
    "Male",
    "Mouth_Slightly_Open",
    "Mustache",
    "Narrow_Eyes",
    "No_Beard",
    "Oval_Face",
    "Pale_Skin",
    "Pointy_Nose",
    "Receding_Hairline",
    "Rosy_Cheeks",
    "Sideburns",
    "Smiling",
    "Straight_Hair",
    "Wavy_Hair",
    "Wearing_Earrings",
    "Wearing_Hat",
    "Wearing_Lipstick",
    "Wearing_Necklace",
    "Wearing_Necktie",
    "Young",
)
IMAGE_FOLDER = "img_align_celeba"
ATTRIBUTE_FILE = "list_attr_celeba.txt"


def attribute_words(values, names=ATTRIBUTES) -> list[str]:
    """The attributes present in one row (values 1 / -1, or booleans), as words."""
    if len(values) != len(names):
        raise DataError(f"A CelebA row has {len(names)} attributes, got {len(values)} values.")
    words = []
    for v, name in zip(values, names, strict=True):
        present = bool(v > 0) if not isinstance(v, bool | np.bool_) else bool(v)
        if name == "No_Beard":
            if not present:
                words.append("beard")
        elif present:
            words.append(name.replace("_", " ").lower())
    return words


def prompt(values, names=ATTRIBUTES) -> str:
    """'Photo of person <attributes present>.' from one attribute row."""
    words = attribute_words(values, names)
    return "Photo of person " + ", ".join(words) + "." if words else "Photo of person."


def prompts_from_tfds(attributes: dict) -> list[str]:
    """Prompts from tfds celeb_a's ``attributes`` feature (name -> bool array [N])."""
    missing = [a for a in ATTRIBUTES if a not in attributes]
    if missing:
        raise DataError(f"tfds celeb_a attributes lack {missing[:3]}...: not CelebA?")
    table = np.stack([np.asarray(attributes[a], bool) for a in ATTRIBUTES], axis=1)
    return [prompt(row.tolist()) for row in table]


def square_crop(images: np.ndarray) -> np.ndarray:
    """The centred largest square of [N, H, W, C] (CelebA's 218x178 -> 178x178)."""
    _, h, w, _ = images.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return images[:, top : top + s, left : left + s]


def prompts_from_folder(directory: str) -> dict[str, str]:
    """{image file name: prompt} from DIR/list_attr_celeba.txt (the original layout)."""
    files, names, values = read_celeba_attributes(os.path.join(directory, ATTRIBUTE_FILE))
    return {f: prompt(v, names) for f, v in zip(files, values, strict=True)}


def write_synthetic(directory: str, n: int = 12, size: int = 24, seed: int = 0):
    """A tiny CelebA in the original layout: DIR/img_align_celeba/000001.jpg ... (faces as
    coloured ellipses whose hair, glasses and smile follow the attributes) and
    DIR/list_attr_celeba.txt. Returns (image folder, the attribute matrix [n, 40] of 1 / -1).
    """
    rng = np.random.default_rng(seed)
    values = np.where(rng.random((n, len(ATTRIBUTES))) < 0.3, 1, -1).astype(np.int8)
    folder = os.path.join(directory, IMAGE_FOLDER)
    os.makedirs(folder, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size] / size
    files = []
    for i, row in enumerate(values):
        on = dict(zip(ATTRIBUTES, row > 0, strict=True))
        img = np.full((size, size, 3), 40, np.uint8)
        face = ((xx - 0.5) / 0.3) ** 2 + ((yy - 0.55) / 0.4) ** 2 < 1
        img[face] = (220, 180, 150) if not on["Pale_Skin"] else (240, 225, 215)
        hair = (yy < 0.25) & face | (yy < 0.2)
        img[hair] = (230, 200, 90) if on["Blond_Hair"] else (30, 20, 10)
        if on["Eyeglasses"]:
            img[(np.abs(yy - 0.45) < 0.04) & face] = (0, 0, 0)
        if on["Smiling"]:
            img[(np.abs(yy - 0.75) < 0.04) & (np.abs(xx - 0.5) < 0.15)] = (200, 40, 40)
        name = f"{i + 1:06d}.jpg"
        Image.fromarray(img).save(os.path.join(folder, name), quality=95)
        files.append(name)
    with open(os.path.join(directory, ATTRIBUTE_FILE), "w") as f:
        f.write(f"{n}\n" + " ".join(ATTRIBUTES) + "\n")
        for name, row in zip(files, values, strict=True):
            f.write(name + " " + " ".join(str(int(v)) for v in row) + "\n")
    return folder, values
