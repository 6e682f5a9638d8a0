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
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9, 8, 3)), jnp.float32)
    ref = nn.Conv(**kwargs)
    ours = Conv(impl="im2col", **kwargs)
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
