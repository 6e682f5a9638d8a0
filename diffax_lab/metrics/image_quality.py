"""Full-reference image quality: PSNR and SSIM of images against their references.

SSIM is Wang et al. (2004), "Image quality assessment: from error visibility to structural
similarity", eq. 13 with their constants: an 11x11 Gaussian window of sigma 1.5, K1 = 0.01,
K2 = 0.03, the population (biased) local statistics, the mean of the SSIM map over the
positions where the window fits (``valid``) and over channels. That is
``skimage.metrics.structural_similarity(x, y, gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=L, channel_axis=-1)`` up to skimage's border
handling (it averages the map over a cropped interior of the reflected-padded map).
Images are [N, H, W, C] in [0, L] (uint8: L = 255).
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import correlate1d

WINDOW, SIGMA, K1, K2 = 11, 1.5, 0.01, 0.03


def psnr(x, y, data_range: float = 255.0) -> np.ndarray:
    """[N] PSNR in dB of each image pair (inf for identical images)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    mse = np.mean(np.square(x - y), axis=tuple(range(1, x.ndim)))
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(data_range**2 / mse)


def gaussian_window(size: int = WINDOW, sigma: float = SIGMA) -> np.ndarray:
    r = np.arange(size) - (size - 1) / 2.0
    g = np.exp(-0.5 * (r / sigma) ** 2)
    return g / g.sum()


def _filter(img, g):
    """The separable Gaussian mean over the valid positions of [N, H, W, C]."""
    out = correlate1d(img, g, axis=1, mode="constant")
    out = correlate1d(out, g, axis=2, mode="constant")
    half = len(g) // 2
    return out[:, half : img.shape[1] - half, half : img.shape[2] - half]


def ssim(x, y, data_range: float = 255.0, window: int = WINDOW, sigma: float = SIGMA):
    """[N] mean SSIM of each image pair [N, H, W, C] (H, W >= the window, else the window
    shrinks to the largest odd size that fits)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(
            f"ssim needs two [N, H, W, C] arrays of one shape, got {x.shape}, {y.shape}."
        )
    size = min(window, x.shape[1], x.shape[2])
    size -= 1 - size % 2
    g = gaussian_window(size, sigma)
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    mx, my = _filter(x, g), _filter(y, g)
    vx = _filter(x * x, g) - mx * mx
    vy = _filter(y * y, g) - my * my
    cxy = _filter(x * y, g) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean(axis=(1, 2, 3))
