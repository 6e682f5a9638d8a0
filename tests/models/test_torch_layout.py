"""diffax_lab.models.torch_layout: PyTorch's parameter layout against Flax's."""

import jax
import numpy as np
import torch  # installed for the tests by .ci/setup

from diffax_lab.models.torch_layout import (
    flax_leaf,
    kernel_from_torch,
    kernel_to_torch,
    torch_leaf,
)


def test_kernels_compute_what_torch_computes_and_round_trip():
    """A Conv2d's and a Linear's weights, converted, give torch's outputs through lax and a
    matmul; converting back restores them exactly."""
    rng = np.random.default_rng(0)
    conv, lin = torch.nn.Conv2d(3, 5, (3, 2), bias=False), torch.nn.Linear(4, 6, bias=False)
    x = rng.normal(size=(2, 3, 7, 6)).astype(np.float32)
    v = rng.normal(size=(2, 4)).astype(np.float32)
    with torch.no_grad():
        want_conv = conv(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
        want_lin = lin(torch.from_numpy(v)).numpy()
    k = kernel_from_torch(conv.weight.detach().numpy())
    got_conv = jax.lax.conv_general_dilated(
        x.transpose(0, 2, 3, 1), k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    np.testing.assert_allclose(np.asarray(got_conv), want_conv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        v @ kernel_from_torch(lin.weight.detach().numpy()), want_lin, rtol=1e-5, atol=1e-6
    )
    for w in (conv.weight, lin.weight):
        w = w.detach().numpy()
        np.testing.assert_array_equal(kernel_to_torch(kernel_from_torch(w)), w)


def test_leaf_names_follow_the_weight_and_module():
    """1-D weights are scales, 2-D tables under ``*_embedding`` are embeddings, and a 4-D
    weight is a convolution's kernel whatever its module is called (CLIP's patch
    embedding is a Conv2d); the inverse gives back ``weight`` and the array."""
    table, norm = np.ones((10, 4)), np.ones(4)
    patch = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    assert flax_leaf(("token_embedding",), table)[0] == "embedding"
    assert flax_leaf(("norm",), norm)[0] == "scale"
    leaf, k = flax_leaf(("embeddings", "patch_embedding"), patch)
    assert leaf == "kernel" and k.shape == (2, 2, 3, 2)
    assert flax_leaf(("proj",), table)[0] == "kernel"
    for path, w in (
        (("token_embedding",), table),
        (("norm",), norm),
        (("patch_embedding",), patch),
    ):
        name, back = torch_leaf(*flax_leaf(path, w))
        assert name == "weight"
        np.testing.assert_array_equal(back, w)
    assert torch_leaf("bias", norm) == ("bias", norm)
