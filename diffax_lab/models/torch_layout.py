"""PyTorch's parameter layout against Flax's: the one place the lab converts between them.

PyTorch stores a convolution's weight as [out, in, kh, kw] (OIHW) and a Linear's as
[out, in]; Flax's ``kernel`` is [kh, kw, in, out] (HWIO) and [in, out]. A PyTorch
``weight`` is also a norm's 1-D scale (Flax ``scale``) or an embedding table (Flax
``embedding``, kept as it is). The checkpoint readers and writers (diffusers' UNet2DModel
and AutoencoderKL, Hugging Face's CLIP, pytorch-fid's Inception) name their modules each
their own way, and all convert the arrays here.
"""

from __future__ import annotations

import numpy as np


def kernel_from_torch(weight: np.ndarray) -> np.ndarray:
    """A Conv's OIHW weight as an HWIO kernel, a Linear's [out, in] as [in, out]."""
    return np.transpose(weight, (2, 3, 1, 0)) if weight.ndim == 4 else weight.T


def kernel_to_torch(kernel: np.ndarray) -> np.ndarray:
    """The inverse of ``kernel_from_torch``."""
    return np.transpose(kernel, (3, 2, 0, 1)) if kernel.ndim == 4 else kernel.T


def flax_leaf(module_path: tuple, weight: np.ndarray) -> tuple[str, np.ndarray]:
    """(Flax leaf name, array) of the PyTorch ``weight`` of the module at ``module_path``:
    a convolution's ``kernel`` (4-D, even when the module is named ``*_embedding``, as
    CLIP's patch embedding is); ``scale`` for a 1-D weight (GroupNorm, LayerNorm);
    ``embedding`` for a 2-D table whose module name ends in ``_embedding`` (as ``nn.Embed``
    keeps it); else a Linear's ``kernel``."""
    if weight.ndim == 4:
        return "kernel", kernel_from_torch(weight)
    if weight.ndim == 1:
        return "scale", weight
    if module_path and str(module_path[-1]).endswith("_embedding"):
        return "embedding", weight
    return "kernel", kernel_from_torch(weight)


def torch_leaf(leaf: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """The inverse of ``flax_leaf`` (other leaves, such as ``bias``, keep their name)."""
    if leaf == "kernel":
        return "weight", kernel_to_torch(value)
    if leaf in ("scale", "embedding"):
        return "weight", value
    return leaf, value
