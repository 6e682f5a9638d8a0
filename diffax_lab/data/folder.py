"""A folder of images (PNG, JPEG, ...), optionally one sub-folder per class, read with Pillow."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from diffax_lab.data.idx import DataError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    return img.resize((size, size), Image.Resampling.BICUBIC) if side != size else img


def load_image_folder(directory: str, image_size: int, channels: int):
    """Images uint8 [N, S, S, C] (centre-cropped, resized) and labels from sub-folder names.

    Images directly in ``directory`` get label 0; each sub-folder is a class, in sorted order.
    """
    if not os.path.isdir(directory):
        raise DataError(f"data.dir {directory!r} (an image folder) does not exist.")
    files = []
    for root, _, names in sorted(os.walk(directory)):
        files += [os.path.join(root, n) for n in sorted(names) if n.lower().endswith(EXTENSIONS)]
    if not files:
        raise DataError(f"No images ({', '.join(EXTENSIONS)}) under data.dir {directory!r}.")
    classes = sorted({os.path.relpath(os.path.dirname(f), directory) for f in files} - {"."})
    class_id = {c: i for i, c in enumerate(classes)}
    mode = {1: "L", 3: "RGB"}[channels]
    images, labels = [], []
    for f in files:
        try:
            with Image.open(f) as img:
                images.append(np.asarray(center_crop_resize(img.convert(mode), image_size)))
        except OSError as e:
            raise DataError(f"Cannot read image {f}: {e}") from e
        labels.append(class_id.get(os.path.relpath(os.path.dirname(f), directory), 0))
    images = np.stack(images).reshape(len(files), image_size, image_size, channels)
    return images, np.asarray(labels, np.int32)
