"""Image grids and strips as PNG files (Pillow). Only process 0 writes (multi-process runs
compute the images on every process)."""

from __future__ import annotations

import math
import os

import jax
import numpy as np
from PIL import Image, ImageDraw, ImageFont


def make_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 [N, H, W, C] -> one uint8 image [rows*(H+pad)+pad, cols*(W+pad)+pad, C]."""
    n, h, w, c = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = images[i]
    return grid


def save_png(path: str, image: np.ndarray, scale: int = 1) -> None:
    if jax.process_index() != 0:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    img.save(path)


def save_grid(path: str, images: np.ndarray, ncols: int | None = None, scale: int = 2) -> None:
    save_png(path, make_grid(images, ncols), scale)


def save_labelled_rows(path: str, rows: list[np.ndarray], labels: list[str], scale: int = 2):
    """One strip per row (each uint8 [N, H, W, C]) with a text label on its left."""
    if jax.process_index() != 0:
        return
    grid = make_grid(np.concatenate(rows), ncols=rows[0].shape[0])
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).convert("RGB")
    img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    # Pillow's own TrueType face (its bitmap fallback without FreeType), sized to the rows.
    row_h = img.height / len(rows)
    font = ImageFont.load_default(size=max(10, min(16, int(row_h / 3))))
    measure = ImageDraw.Draw(img)
    margin = int(max(measure.textlength(s, font=font) for s in labels)) + 12
    canvas = Image.new("RGB", (img.width + margin, img.height), "white")
    canvas.paste(img, (margin, 0))
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(labels):
        _, top, _, bottom = draw.textbbox((0, 0), text, font=font)
        draw.text((4, int(i * row_h + (row_h - top - bottom) / 2)), text, fill="black", font=font)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)
