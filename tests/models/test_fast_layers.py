"""The CPU-fast arrangements of GroupNorm, attention, nearest upsampling and dropout compute
what Flax's nn.GroupNorm, jax.nn.dot_product_attention, jax.image.resize and nn.Dropout
compute: values and gradients (their hand-written backwards included), masks bit for bit,
dtypes and parameter trees."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax_lab.models import layers


def _rand(key, shape, scale=1.0, shift=0.0):
    return jax.random.normal(jax.random.PRNGKey(key), shape) * scale + shift


@pytest.mark.parametrize("shape, groups", [((3, 5, 7, 16), 4), ((2, 6, 12), 3), ((4, 8), 2)])
def test_group_norm_matches_flax_values_and_gradients(shape, groups):
    x = _rand(0, shape, 3.0, 1.0)  # a mean far from 0: the E[x^2] - E[x]^2 path is exercised
    ref = nn.GroupNorm(groups, epsilon=1e-6)
    params = ref.init(jax.random.PRNGKey(1), x)
    params = jax.tree.map(lambda a: a + _rand(2, a.shape), params)  # not ones / zeros
    ours = layers.GroupNorm(groups)
    ours_params = {"params": {"norm": params["params"]}}
    assert jax.tree.structure(ours.init(jax.random.PRNGKey(1), x)) == jax.tree.structure(
        ours_params
    )
    g = _rand(3, shape)

    def loss(apply, p, x):
        return jnp.sum(jnp.sin(apply(p, x)) * g)

    (v_ref, g_ref) = jax.value_and_grad(lambda p, x: loss(ref.apply, p, x), (0, 1))(params, x)
    (v, g_ours) = jax.value_and_grad(lambda p, x: loss(ours.apply, p, x), (0, 1))(ours_params, x)
    np.testing.assert_allclose(ours.apply(ours_params, x), ref.apply(params, x), atol=1e-5)
    np.testing.assert_allclose(v, v_ref, rtol=1e-5)
    for a, b in zip(
        jax.tree.leaves(g_ref[0]["params"]),
        jax.tree.leaves(g_ours[0]["params"]["norm"]),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(g_ours[1], g_ref[1], rtol=1e-4, atol=1e-5)


def test_group_norm_keeps_float32_statistics_and_the_input_dtype_of_its_gradient():
    x = _rand(0, (2, 4, 4, 8), 2.0).astype(jnp.bfloat16)
    norm = layers.GroupNorm(4, dtype=jnp.bfloat16)
    params = norm.init(jax.random.PRNGKey(0), x)
    y = norm.apply(params, x)
    assert y.dtype == jnp.bfloat16
    ref = nn.GroupNorm(4, epsilon=1e-6).apply(
        {"params": params["params"]["norm"]}, x.astype(jnp.float32)
    )
    np.testing.assert_allclose(y.astype(jnp.float32), ref, atol=2e-2)
    dx = jax.grad(lambda x: jnp.sum(norm.apply(params, x).astype(jnp.float32) ** 2))(x)
    assert dx.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="groups must divide"):
        layers.group_norm(jnp.zeros((1, 6)), jnp.ones(6), jnp.zeros(6), 4, 1e-6)


@pytest.mark.parametrize("heads, t, s", [(1, 7, 7), (3, 5, 9)])
@pytest.mark.parametrize("masked", [False, True])
def test_lab_attention_matches_jax_nn(heads, t, s, masked):
    d = 4
    q, k, v, g = (
        _rand(i, shape)
        for i, shape in enumerate(
            [(2, t, heads, d), (2, s, heads, d), (2, s, heads, d), (2, t, heads, d)]
        )
    )
    mask = None
    if masked:  # a random key mask, and batch 0 with every key masked (uniform weights)
        mask = jax.random.bernoulli(jax.random.PRNGKey(9), 0.6, (2, 1, 1, s)).at[0].set(False)

    def run(impl):
        def loss(q, k, v):
            return jnp.sum(layers.dot_product_attention(q, k, v, mask=mask, impl=impl) * g)

        return layers.dot_product_attention(q, k, v, mask=mask, impl=impl), jax.grad(
            loss, (0, 1, 2)
        )(q, k, v)

    (y_ref, g_ref), (y, g_lab) = run("xla"), run("lab")
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_ref, g_lab, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_attention_impl_table_and_refusal(monkeypatch):
    q = _rand(0, (1, 3, 1, 2))
    monkeypatch.setitem(layers.ATTENTION_IMPL_BY_BACKEND, jax.default_backend(), "lab")
    jaxpr = str(jax.make_jaxpr(lambda q: layers.dot_product_attention(q, q, q))(q))
    assert "custom_vjp_call" in jaxpr
    monkeypatch.setitem(layers.ATTENTION_IMPL_BY_BACKEND, jax.default_backend(), "xla")
    jaxpr = str(jax.make_jaxpr(lambda q: layers.dot_product_attention(q, q, q))(q))
    assert "custom_vjp_call" not in jaxpr
    with pytest.raises(ValueError, match="attention impl"):
        layers.dot_product_attention(q, q, q, impl="flash")


def test_attention_bf16_output_dtype_and_closeness():
    q, k, v = (_rand(i, (2, 6, 2, 8)).astype(jnp.bfloat16) for i in range(3))
    y = layers.dot_product_attention(q, k, v, impl="lab")
    assert y.dtype == jnp.bfloat16
    ref = jax.nn.dot_product_attention(*(a.astype(jnp.float32) for a in (q, k, v)))
    np.testing.assert_allclose(y.astype(jnp.float32), ref, atol=5e-2)


def test_nearest_upsample_is_jax_image_resize():
    x = _rand(0, (2, 3, 5, 4))
    up = layers.Upsample(4, kind="nearest")
    params = up.init(jax.random.PRNGKey(0), x)
    conv = nn.Conv(4, (3, 3))
    ref = conv.apply(
        {"params": params["params"]["conv"]}, jax.image.resize(x, (2, 6, 10, 4), "nearest")
    )
    np.testing.assert_array_equal(up.apply(params, x), ref)


def test_lab_attention_in_slices_matches_jax_nn(monkeypatch):
    """Large score tensors run in slices of the folded batch (lax.map); forced here on a
    small problem, forward and backward, with a key mask."""
    monkeypatch.setattr(layers, "_CHUNK_ABOVE", 8 * 9)
    monkeypatch.setattr(layers, "_CHUNK_ELEMENTS", 2 * 8 * 9)
    q, k, v, g = (
        _rand(i, s) for i, s in enumerate([(3, 8, 2, 4), (3, 9, 2, 4), (3, 9, 2, 4), (3, 8, 2, 4)])
    )
    mask = jax.random.bernoulli(jax.random.PRNGKey(9), 0.6, (3, 1, 1, 9))
    jaxpr = str(jax.make_jaxpr(lambda q: layers.dot_product_attention(q, k, v, impl="lab"))(q))
    assert "while" in jaxpr or "scan" in jaxpr  # the slices are a loop

    def run(impl):
        def loss(q, k, v):
            return jnp.sum(layers.dot_product_attention(q, k, v, mask=mask, impl=impl) * g)

        return jax.value_and_grad(loss, (0, 1, 2))(q, k, v)

    (l_ref, g_ref), (l_lab, g_lab) = run("xla"), run("lab")
    np.testing.assert_allclose(l_lab, l_ref, rtol=1e-5)
    for a, b in zip(g_ref, g_lab, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def _tiny_unet():
    from diffax_lab.models.unet import UNet

    model = UNet(
        out_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
        attention_resolutions=(4,), attention_heads=2, num_groups=4,
    )  # fmt: skip
    x, t = _rand(0, (2, 8, 8, 1)), jnp.array([0.3, 0.7])
    params = model.init(jax.random.PRNGKey(0), x, t)
    params = jax.tree.map(lambda a: a + 0.05 * _rand(1, a.shape), params)  # no zero convs
    return model, params, x, t


def test_forward_mode_through_the_unet_inside_forward_mode_ready(monkeypatch):
    """The CPU rules are reverse-mode only: jax.jvp through the U-Net refuses outside the
    context and works inside it, where u^T (J v) from jvp equals (J^T u)^T v from vjp."""
    monkeypatch.setitem(layers.ATTENTION_IMPL_BY_BACKEND, jax.default_backend(), "lab")
    monkeypatch.setitem(layers.NORM_BACKWARD_BY_BACKEND, jax.default_backend(), "lab")
    model, params, x, t = _tiny_unet()
    f = lambda x: model.apply(params, x, t)  # noqa: E731
    v, u = _rand(5, x.shape), _rand(6, x.shape)
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(f, (x,), (v,))
    with layers.forward_mode_ready():
        y, jv = jax.jvp(f, (x,), (v,))
    _, vjp = jax.vjp(f, x)  # outside: the hand-written reverse rules
    np.testing.assert_allclose(jnp.vdot(u, jv), jnp.vdot(vjp(u)[0], v), rtol=1e-4)
    np.testing.assert_allclose(y, f(x), rtol=1e-6, atol=1e-6)


def test_group_norm_backward_table(monkeypatch):
    x = _rand(0, (2, 4, 4, 8), 2.0, 0.5)
    norm = layers.GroupNorm(4)
    params = jax.tree.map(lambda a: a + _rand(1, a.shape), norm.init(jax.random.PRNGKey(0), x))

    def grads():
        return jax.grad(lambda p, x: jnp.sum(jnp.cos(norm.apply(p, x))), (0, 1))(params, x)

    backend = jax.default_backend()
    monkeypatch.setitem(layers.NORM_BACKWARD_BY_BACKEND, backend, "lab")
    lab = grads()
    assert "custom_vjp_call" in str(jax.make_jaxpr(lambda x: norm.apply(params, x))(x))
    monkeypatch.setitem(layers.NORM_BACKWARD_BY_BACKEND, backend, "autodiff")
    auto = grads()
    assert "custom_vjp_call" not in str(jax.make_jaxpr(lambda x: norm.apply(params, x))(x))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), lab, auto)
    monkeypatch.setitem(layers.NORM_BACKWARD_BY_BACKEND, backend, "fused")
    with pytest.raises(ValueError, match="'lab' or 'autodiff'"):
        norm.apply(params, x)


@pytest.mark.parametrize("shape", [(5,), (3, 7), (2, 9, 9, 16)])
def test_threefry_is_jax_random_bits(shape):
    """The unrolled hash of the lab's dropout is JAX's default PRNG, bit for bit."""
    key = jax.random.fold_in(jax.random.key(3), 11)
    k = jax.random.key_data(key)
    count = jax.lax.iota(jnp.uint32, int(np.prod(shape))).reshape(shape)
    b1, b2 = jax.jit(layers._threefry2x32)(k[0], k[1], jnp.zeros_like(count), count)
    np.testing.assert_array_equal(b1 ^ b2, jax.random.bits(key, shape))


@pytest.mark.parametrize("broadcast_dims", [(), (1, 2), (-1,)])
@pytest.mark.parametrize("typed_key", [True, False])
def test_lab_dropout_is_flax_dropout_bit_for_bit(broadcast_dims, typed_key):
    x = _rand(0, (4, 8, 8, 16))
    key = jax.random.key(1) if typed_key else jax.random.PRNGKey(1)
    rngs = {"dropout": key}
    ref = nn.Dropout(0.1, broadcast_dims=broadcast_dims).apply({}, x, False, rngs=rngs)
    assert 0.02 < float(jnp.mean(ref == 0)) < 0.3  # a mask was applied
    for impl in ("lab", "jax"):
        drop = layers.Dropout(0.1, broadcast_dims=broadcast_dims, impl=impl)
        out = jax.jit(lambda x, d=drop: d.apply({}, x, False, rngs=rngs))(x)
        np.testing.assert_array_equal(out, ref)
    assert layers.Dropout(0.1).apply({}, x, True) is x
    np.testing.assert_array_equal(layers.Dropout(1.0).apply({}, x, False, rngs=rngs), 0 * x)


def test_lab_bernoulli_has_no_loop_and_falls_back_for_other_prngs():
    """The point of "lab": no rolled while loop (JAX's Threefry lowering on the CPU); keys of
    another PRNG implementation get jax.random.bernoulli's own draw."""
    key = jax.random.key(2)
    jaxpr = str(jax.make_jaxpr(lambda k: layers.bernoulli(k, 0.9, (4, 5), "lab"))(key))
    assert "while" not in jaxpr and "threefry2x32" not in jaxpr
    rbg = jax.random.key(2, impl="rbg")
    np.testing.assert_array_equal(
        layers.bernoulli(rbg, 0.9, (4, 5), "lab"), jax.random.bernoulli(rbg, 0.9, (4, 5))
    )
    with jax.threefry_partitionable(False):  # JAX's other counter layout: its own draw
        np.testing.assert_array_equal(
            layers.bernoulli(key, 0.5, (64,), "lab"), jax.random.bernoulli(key, 0.5, (64,))
        )
    with pytest.raises(ValueError, match="bernoulli impl"):
        layers.bernoulli(key, 0.9, (4,), "philox")


def test_unet_train_pass_with_dropout_is_unchanged_by_the_lab_mask(monkeypatch):
    """Same module names, same make_rng keys, same masks: a U-Net train step's loss and
    gradients are identical under either impl (runs and checkpoints carry over)."""
    from diffax_lab.models.unet import UNet

    model = UNet(
        out_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
        attention_resolutions=(), num_groups=4, dropout=0.3,
    )  # fmt: skip
    x, t = _rand(0, (2, 8, 8, 1)), jnp.array([0.3, 0.7])
    params = model.init(jax.random.PRNGKey(0), x, t)
    params = jax.tree.map(lambda a: a + 0.05 * _rand(1, a.shape), params)

    def loss(p):
        y = model.apply(p, x, t, train=True, rngs={"dropout": jax.random.key(4)})
        return jnp.sum(y**2)

    results = {}
    for impl in ("lab", "jax"):
        monkeypatch.setitem(layers.DROPOUT_IMPL_BY_BACKEND, jax.default_backend(), impl)
        results[impl] = jax.jit(jax.value_and_grad(loss))(params)
    jax.tree.map(np.testing.assert_array_equal, results["lab"], results["jax"])
    eval_loss = jnp.sum(model.apply(params, x, t) ** 2)
    assert not np.isclose(float(results["lab"][0]), float(eval_loss))  # dropout was on
