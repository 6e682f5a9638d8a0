"""The Inception-v3 of FID (pytorch-fid's ``InceptionV3``, FID variant) in Flax, NHWC.

FID (Heusel et al. 2017) is defined by one network: the 2015-12-05 TensorFlow
Inception-v3 graph, which pytorch-fid ports as ``pt_inception-2015-12-05-6726825d.pth``.
It differs from torchvision's Inception-v3 in four blocks (``FIDInceptionA``,
``FIDInceptionC``, ``FIDInceptionE_1``, ``FIDInceptionE_2``): TensorFlow's average pools
leave the zero padding out of the mean, and the last block max-pools. This module is that
network up to pool3 (the 2048-d global average pool), with pytorch-fid's input handling:
images in [0, 1] are resized to 299 x 299 bilinearly as ``F.interpolate(...,
align_corners=False)`` does (no antialiasing, also when shrinking), then scaled to [-1, 1].

- ``InceptionV3FID``: the network, ``apply(variables, x [B, H, W, 3] in [0, 1]) -> [B, 2048]``.
- ``load_inception(path)``: (network, variables) from a safetensors file.
- ``InceptionFeatures(path)``: the feature extractor of ``metrics/features.py``
  (``name``, ``__call__(images_uint8) -> [N, 2048]``), so FID and KID in Inception space
  sit beside the judge-space ones.
- One-time, offline conversion of pytorch-fid's pickle (the only place torch.load appears,
  and the lab never runs it on its own)::

      python -m diffax_lab.models.inception --convert pt_inception-2015-12-05-6726825d.pth \\
          pt_inception-2015-12-05.safetensors

Not for: the FID formula or reference statistics (``metrics/fid.py``), or Inception Score
(the logits head is not built).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from diffax_lab.models.torch_layout import kernel_from_torch

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_SHA256_PREFIX = "6726825d"  # torch.hub's hash prefix in pytorch-fid's file name
INPUT_SIZE = 299
FEATURE_DIM = 2048
BN_EPS = 1e-3  # torchvision's BasicConv2d (TensorFlow's default)
# Full float32 convolutions on accelerators too (XLA's default there is TF32/bf16 passes):
# FID compares across papers, so its features should not depend on the device.
PRECISION = jax.lax.Precision.HIGHEST


def resize_bilinear(x, size: int | tuple[int, int]):
    """[B, H, W, C] -> [B, h, w, C] as torch's ``F.interpolate(mode='bilinear',
    align_corners=False)``: source = (dst + 0.5) * in / out - 0.5, clamped at 0, no
    antialiasing (``jax.image.resize`` antialiases when shrinking, which differs)."""
    h, w = (size, size) if isinstance(size, int) else size
    pos = np.float64 if x.dtype == jnp.float64 else np.float32
    return jnp.einsum(
        "oh,bhwc,pw->bopc",
        jnp.asarray(_interp_matrix(x.shape[1], h, pos), x.dtype),
        x,
        jnp.asarray(_interp_matrix(x.shape[2], w, pos), x.dtype),
        precision=PRECISION,
    )


def _interp_matrix(n_in: int, n_out: int, pos_dtype=np.float32) -> np.ndarray:
    """[n_out, n_in] weights of torch's linear interpolation along one axis, the source
    positions computed in ``pos_dtype`` as torch's CPU kernel does (float32 for float32
    images, float64 for float64)."""
    f = pos_dtype
    scale = f(n_in) / f(n_out)
    src = np.maximum(scale * (np.arange(n_out, dtype=f) + f(0.5)) - f(0.5), f(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = (src - i0.astype(f)).astype(np.float64)
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), i0), 1.0 - lam)
    np.add.at(m, (np.arange(n_out), i1), lam)
    return m


class BasicConv(nn.Module):
    """Conv (no bias) -> BatchNorm (running statistics, eps 1e-3) -> ReLU."""

    features: int
    kernel: tuple[int, int]
    strides: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        ph, pw = self.padding
        x = nn.Conv(
            self.features,
            self.kernel,
            strides=(self.strides, self.strides),
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            precision=PRECISION,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
        return nn.relu(x)


def _avg_pool_tf(x):
    # TensorFlow's average pool: the padded zeros are not counted (the FID patch).
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_s2(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2))


class FIDInceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
        b5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
        b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_tf(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(384, (3, 3), strides=2, name="branch3x3")(x)
        bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_s2(x)], axis=-1)


class FIDInceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
        b7 = BasicConv(c7, (1, 1), name="branch7x7_1")(x)
        b7 = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv(192, (1, 1), name="branch_pool")(_avg_pool_tf(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
        b3 = BasicConv(320, (3, 3), strides=2, name="branch3x3_2")(b3)
        b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_s2(x)], axis=-1)


class FIDInceptionE(nn.Module):
    """``FIDInceptionE_1`` (pool="avg", TF's average pool) or ``FIDInceptionE_2``
    (pool="max": the FID graph max-pools in its last block)."""

    pool: str = "avg"

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
        b3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
            ],
            axis=-1,
        )
        bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [
                BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
            ],
            axis=-1,
        )
        if self.pool == "avg":
            pooled = _avg_pool_tf(x)
        else:
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        bp = BasicConv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3FID(nn.Module):
    """pytorch-fid's ``InceptionV3(output_blocks=[3])``: [B, H, W, 3] in [0, 1] -> [B, 2048].

    Module names are torchvision's, so a state-dict key maps by its dots.
    """

    resize_input: bool = True
    normalize_input: bool = True
    dtype: Any = jnp.float32  # compute dtype (float64 under jax.enable_x64, for tests)

    @nn.compact
    def __call__(self, x):
        x = x.astype(self.dtype)
        if self.resize_input:
            x = resize_bilinear(x, INPUT_SIZE)
        if self.normalize_input:
            x = 2.0 * x - 1.0  # [0, 1] -> [-1, 1]
        x = BasicConv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_s2(x)
        x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_s2(x)
        x = FIDInceptionA(32, name="Mixed_5b")(x)
        x = FIDInceptionA(64, name="Mixed_5c")(x)
        x = FIDInceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = FIDInceptionC(128, name="Mixed_6b")(x)
        x = FIDInceptionC(160, name="Mixed_6c")(x)
        x = FIDInceptionC(160, name="Mixed_6d")(x)
        x = FIDInceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = FIDInceptionE("avg", name="Mixed_7b")(x)
        x = FIDInceptionE("max", name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))  # pool3


# ---------------------------------------------------------------- weights

# State-dict keys outside pool3's path: the logits layer (and an aux head if present).
UNUSED_KEY = re.compile(r"^(fc|AuxLogits)\.|\.num_batches_tracked$")


def convert_state_dict(state_dict) -> dict[str, np.ndarray]:
    """pytorch-fid's state dict (torch tensors or arrays) -> float32 numpy arrays in torch
    layout, without ``num_batches_tracked``: what ``save_file`` writes."""
    out = {}
    for k, v in state_dict.items():
        if k.endswith("num_batches_tracked"):
            continue
        a = v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
        out[k] = np.ascontiguousarray(a, np.float32)
    return out


def save_converted(state_dict, out_path: str, source_sha256: str = "") -> None:
    """Writes ``convert_state_dict(state_dict)`` to safetensors, recording the source hash."""
    from safetensors.numpy import save_file  # noqa: PLC0415

    save_file(convert_state_dict(state_dict), out_path, metadata={"source_sha256": source_sha256})


def _variables_from_arrays(arrays: dict[str, np.ndarray], path: str) -> dict:
    """{"params", "batch_stats"} of ``InceptionV3FID`` from torch-named arrays."""
    want = jax.eval_shape(
        lambda: InceptionV3FID(resize_input=False).init(
            jax.random.PRNGKey(0), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3))
        )
    )
    flat = {}
    expected = set()
    for (col, *mods, leaf), shape in traverse_util.flatten_dict(want).items():
        torch_leaf = {
            ("params", "kernel"): "weight",
            ("params", "scale"): "weight",
            ("params", "bias"): "bias",
            ("batch_stats", "mean"): "running_mean",
            ("batch_stats", "var"): "running_var",
        }[(col, leaf)]
        key = ".".join(mods + [torch_leaf])
        expected.add(key)
        fix = (
            f"convert pytorch-fid's {FID_WEIGHTS_FILE} with `python -m "
            "diffax_lab.models.inception --convert IN.pth OUT.safetensors`"
        )
        if key not in arrays:
            raise ValueError(f"{path}: missing {key}; {fix}.")
        s = shape.shape
        torch_shape = (s[3], s[2], s[0], s[1]) if leaf == "kernel" else s
        if arrays[key].shape != torch_shape:
            raise ValueError(
                f"{path}: {key} has shape {list(arrays[key].shape)}, Inception-v3 (FID) has "
                f"{list(torch_shape)}: not pytorch-fid's weights; {fix}."
            )
        a = arrays[key]
        if leaf == "kernel":
            a = kernel_from_torch(a)  # [out, in, kh, kw] -> [kh, kw, in, out]
        flat[(col, *mods, leaf)] = jnp.asarray(a, jnp.float32)
    extra = sorted(k for k in arrays if k not in expected and not UNUSED_KEY.search(k))
    if extra:
        raise ValueError(
            f"{path}: unexpected keys {extra[:8]}: not pytorch-fid's Inception-v3 weights."
        )
    return traverse_util.unflatten_dict(flat)


def load_inception(path: str, dtype: Any = jnp.float32) -> tuple[InceptionV3FID, dict, dict]:
    """(network, variables, metadata) from a converted safetensors file."""
    if path.endswith((".pth", ".pt", ".bin", ".pkl")):
        raise ValueError(
            f"{path} is a pickle, which diffax_lab never loads at run time; convert it once "
            f"with: python -m diffax_lab.models.inception --convert {path} "
            f"{os.path.splitext(path)[0]}.safetensors"
        )
    from safetensors import safe_open  # noqa: PLC0415

    with safe_open(path, framework="numpy") as f:
        arrays = {k: f.get_tensor(k) for k in f.keys()}
        metadata = dict(f.metadata() or {})
    variables = jax.tree.map(lambda a: a.astype(dtype), _variables_from_arrays(arrays, path))
    return InceptionV3FID(dtype=dtype), variables, metadata


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class InceptionFeatures:
    """FID's feature space: pool3 of pytorch-fid's Inception-v3, as an extractor.

    ``name`` is ``inception-fid-<first 12 hex of the weights file's sha256>``, so cached
    reference features follow the weights; ``is_pytorch_fid_weights`` says whether the
    file was converted from pytorch-fid's own .pth (only then is an FD here FID).
    """

    def __init__(self, weights_path: str, batch_size: int = 100, dtype: Any = jnp.float32):
        self.model, self.variables, meta = load_inception(weights_path, dtype)
        self.dtype = dtype
        self.batch_size = batch_size
        self.name = f"inception-fid-{file_digest(weights_path)[:12]}"
        self.is_pytorch_fid_weights = meta.get("source_sha256", "").startswith(
            FID_WEIGHTS_SHA256_PREFIX
        )
        self._features = jax.jit(self.model.apply)

    def __call__(self, images_u8: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(images_u8), self.batch_size):
            batch = np.asarray(images_u8[i : i + self.batch_size])
            n = len(batch)
            if n < self.batch_size:  # pad: one compiled shape for every batch
                pad = np.zeros((self.batch_size - n,) + batch.shape[1:], batch.dtype)
                batch = np.concatenate([batch, pad])
            x = unit_rgb(batch, self.dtype)
            out.append(np.asarray(self._features(self.variables, x))[:n])
        return np.concatenate(out)


def unit_rgb(images_u8: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
    """uint8 [N, H, W, 1 or 3] -> [N, H, W, 3] in [0, 1] of ``dtype``, as pytorch-fid reads
    images: PIL's convert('RGB') (grey repeated) and torchvision's ToTensor (/ 255)."""
    if images_u8.dtype != np.uint8 or images_u8.ndim != 4 or images_u8.shape[-1] not in (1, 3):
        raise ValueError(
            "InceptionFeatures takes uint8 images [N, H, W, 1 or 3], got "
            f"{images_u8.dtype} {images_u8.shape}."
        )
    x = images_u8.astype(dtype) / np.asarray(255.0, dtype)
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m diffax_lab.models.inception",
        description="One-time, offline conversion of pytorch-fid's Inception weights (a "
        "pickle) to safetensors. This is the only place diffax_lab calls torch.load.",
    )
    parser.add_argument("--convert", nargs=2, metavar=("IN_PTH", "OUT_SAFETENSORS"), required=True)
    args = parser.parse_args(argv)
    src, dst = args.convert
    digest = file_digest(src)
    if FID_WEIGHTS_SHA256_PREFIX in os.path.basename(src) and not digest.startswith(
        FID_WEIGHTS_SHA256_PREFIX
    ):
        raise SystemExit(f"{src}: sha256 {digest[:8]}... does not match its name; re-download.")
    import torch  # noqa: PLC0415  (offline conversion only)

    # --- The one pickle load: weights_only=True refuses anything but tensors. ---
    state_dict = torch.load(src, map_location="cpu", weights_only=True)
    save_converted(state_dict, dst, source_sha256=digest)
    _variables_from_arrays(convert_state_dict(state_dict), dst)  # refuse a wrong file now
    print(f"wrote {dst} ({len(convert_state_dict(state_dict))} tensors, source sha256 {digest})")


if __name__ == "__main__":
    main()
