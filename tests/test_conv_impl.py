"""layers.Conv: nn.Conv's parameter tree and values, whichever implementation runs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax_lab.models.layers import Conv
from tests.helpers import conv_matches_nn_conv


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(features=5, kernel_size=(3, 3)),  # SAME, the U-Net's 3x3
        dict(features=4, kernel_size=(3, 3), strides=(2, 2), padding=((0, 1), (0, 1))),
        dict(features=2, kernel_size=(2, 3), padding="VALID", use_bias=False),
    ],
)
def test_im2col_matches_nn_conv(kwargs):
    conv_matches_nn_conv(kwargs, "im2col")


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(features=5, kernel_size=(1, 1)),  # the ResBlock's skip projection
        dict(features=4, kernel_size=(1, 1), padding="VALID", use_bias=False),
        dict(features=3, kernel_size=(1, 1), padding=((0, 0), (0, 0))),  # the VAE's form
    ],
)
def test_lab_pointwise_dot_matches_nn_conv(kwargs):
    conv_matches_nn_conv(kwargs, "lab")


def test_auto_uses_the_backend_table(monkeypatch):
    from diffax_lab.models import layers

    x = jnp.ones((1, 4, 4, 2))
    m = Conv(features=2, kernel_size=(3, 3))
    params = m.init(jax.random.PRNGKey(0), x)
    monkeypatch.setitem(layers.CONV_IMPL_BY_BACKEND, jax.default_backend(), "im2col")
    jaxpr = str(jax.make_jaxpr(lambda p: m.apply(p, x))(params))
    assert "conv_general_dilated" not in jaxpr and "dot_general" in jaxpr
    monkeypatch.setitem(layers.CONV_IMPL_BY_BACKEND, jax.default_backend(), "xla")
    assert "conv_general_dilated" in str(jax.make_jaxpr(lambda p: m.apply(p, x))(params))
    with pytest.raises(ValueError, match="impl"):
        Conv(features=2, kernel_size=(3, 3), impl="winograd").init(jax.random.PRNGKey(0), x)


@pytest.mark.parametrize(
    "kwargs, dot",
    [
        (dict(kernel_size=(1, 1)), True),
        (dict(kernel_size=(3, 3)), False),  # "lab" keeps XLA's convolution beyond 1x1
        (dict(kernel_size=(1, 1), strides=(2, 2)), False),
        (dict(kernel_size=(1, 1), padding=((1, 1), (0, 0))), False),
    ],
)
def test_lab_runs_only_unpadded_stride_1_pointwise_convs_as_a_dot(kwargs, dot):
    x = jnp.ones((1, 4, 4, 2))
    m = Conv(features=3, impl="lab", **kwargs)
    params = m.init(jax.random.PRNGKey(0), x)
    jaxpr = str(jax.make_jaxpr(lambda p: m.apply(p, x))(params))
    assert ("conv_general_dilated" not in jaxpr) == dot
    np.testing.assert_allclose(
        m.apply(params, x), nn.Conv(features=3, **kwargs).apply(params, x), rtol=1e-6
    )


def test_bf16_pointwise_dot_keeps_nn_conv_dtype():
    x = jnp.ones((1, 4, 4, 2))
    ref, ours = (c(features=3, kernel_size=(1, 1), dtype=jnp.bfloat16) for c in (nn.Conv, Conv))
    params = ref.init(jax.random.PRNGKey(0), x)
    assert Conv(3, (1, 1), dtype=jnp.bfloat16, impl="lab").apply(params, x).dtype == jnp.bfloat16
    assert ours.apply(params, x).dtype == ref.apply(params, x).dtype


def test_a_registered_impl_replaces_xlas_convolution_but_not_the_1x1_dot(monkeypatch):
    """layers.register_conv_impl: the function runs for the 2-D convolutions beyond 1x1
    (with nn.Conv's parameters, strides and explicit pads), 1x1 ones stay dots as "lab",
    and a built-in name cannot be taken."""
    from diffax_lab.models import layers

    monkeypatch.setattr(layers, "CONV_IMPLS", {})
    calls = []

    def mine(x, kernel, strides, pads, precision):
        calls.append((kernel.shape, strides, pads))
        return layers.xla_conv(x, kernel, strides, pads, precision)

    layers.register_conv_impl("mine", mine)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9, 8, 3)), jnp.float32)
    conv_matches_nn_conv(dict(features=4, kernel_size=(3, 3), strides=(2, 2)), "mine")
    assert ((3, 3, 3, 4), (2, 2), ((1, 1), (0, 1))) in calls  # SAME on 9 x 8, made explicit
    calls.clear()
    m = Conv(features=2, kernel_size=(1, 1), impl="mine")
    jaxpr = str(jax.make_jaxpr(lambda p: m.apply(p, x))(m.init(jax.random.PRNGKey(0), x)))
    assert not calls and "dot_general" in jaxpr and "conv_general_dilated" not in jaxpr
    with pytest.raises(ValueError, match="built in"):
        layers.register_conv_impl("lab", mine)
    with pytest.raises(ValueError, match="'mine'"):  # the error lists what is registered
        Conv(features=2, kernel_size=(3, 3), impl="winograd").init(jax.random.PRNGKey(0), x)


def test_conv_from_pieces_runs_the_given_pieces_and_xlas_for_the_rest(monkeypatch):
    """layers.conv_from_pieces: a forward and a kernel gradient of one's own (im2col here)
    and an input gradient that declines (None, so XLA's runs) make nn.Conv's convolution,
    values and gradients, each piece called."""
    from diffax_lab.models import layers

    monkeypatch.setattr(layers, "CONV_IMPLS", {})
    ran = []

    def forward(x, kernel, strides, pads):
        ran.append("forward")
        return layers._im2col_conv(x, kernel, strides, pads)

    def input_grad(g, kernel, x_shape, strides, pads):
        ran.append("input_grad")
        return None

    def kernel_grad(x, g, kernel_shape, strides, pads):
        ran.append("kernel_grad")
        k = jnp.zeros(kernel_shape, x.dtype)  # linear in the kernel: any point will do
        return jax.vjp(lambda k: layers._im2col_conv(x, k, strides, pads), k)[1](g)[0]

    layers.register_conv_impl("pieces", layers.conv_from_pieces(forward, input_grad, kernel_grad))
    conv_matches_nn_conv(dict(features=4, kernel_size=(3, 3), strides=(2, 2)), "pieces")
    assert set(ran) == {"forward", "input_grad", "kernel_grad"}
