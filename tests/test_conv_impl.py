"""layers.Conv: nn.Conv's parameter tree and values, whichever implementation runs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax_lab.models.layers import Conv


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(features=5, kernel_size=(3, 3)),  # SAME, the U-Net's 3x3
        dict(features=4, kernel_size=(3, 3), strides=(2, 2), padding=((0, 1), (0, 1))),
        dict(features=2, kernel_size=(2, 3), padding="VALID", use_bias=False),
    ],
)
def test_im2col_matches_nn_conv(kwargs):
    _matches_nn_conv(kwargs, "im2col")


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(features=5, kernel_size=(1, 1)),  # the ResBlock's skip projection
        dict(features=4, kernel_size=(1, 1), padding="VALID", use_bias=False),
        dict(features=3, kernel_size=(1, 1), padding=((0, 0), (0, 0))),  # the VAE's form
    ],
)
def test_lab_pointwise_dot_matches_nn_conv(kwargs):
    _matches_nn_conv(kwargs, "lab")


def _matches_nn_conv(kwargs, impl):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9, 8, 3)), jnp.float32)
    ref = nn.Conv(**kwargs)
    ours = Conv(impl=impl, **kwargs)
    params = ref.init(jax.random.PRNGKey(1), x)
    ours_params = ours.init(jax.random.PRNGKey(1), x)
    assert jax.tree.structure(params) == jax.tree.structure(ours_params)
    jax.tree.map(np.testing.assert_array_equal, params, ours_params)

    @jax.jit
    def outputs_and_grads(params, x):
        def both(m):
            y = m.apply(params, x)
            g = jax.grad(lambda p, x: (m.apply(p, x) ** 2).sum(), argnums=(0, 1))(params, x)
            return y, g

        return both(ref), both(ours)

    (y_ref, g_ref), (y, g) = outputs_and_grads(params, x)
    assert y.shape == y_ref.shape
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), g_ref, g)


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
        dn = ("NHWC", "HWIO", "NHWC")
        return jax.lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=dn)

    layers.register_conv_impl("mine", mine)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9, 8, 3)), jnp.float32)
    _matches_nn_conv(dict(features=4, kernel_size=(3, 3), strides=(2, 2)), "mine")
    assert ((3, 3, 3, 4), (2, 2), ((1, 1), (0, 1))) in calls  # SAME on 9 x 8, made explicit
    calls.clear()
    m = Conv(features=2, kernel_size=(1, 1), impl="mine")
    jaxpr = str(jax.make_jaxpr(lambda p: m.apply(p, x))(m.init(jax.random.PRNGKey(0), x)))
    assert not calls and "dot_general" in jaxpr and "conv_general_dilated" not in jaxpr
    with pytest.raises(ValueError, match="built in"):
        layers.register_conv_impl("lab", mine)
    with pytest.raises(ValueError, match="'mine'"):  # the error lists what is registered
        Conv(features=2, kernel_size=(3, 3), impl="winograd").init(jax.random.PRNGKey(0), x)
