import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax_lab.models import ddpm_cifar10_unet
from diffax_lab.models.layers import Upsample, space_to_depth
from diffax_lab.models.unet import UNet

TINY = dict(
    base_channels=16,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(14, 16),
    num_groups=8,
    out_channels=1,
)


def _init(model, shape, **kw):
    """Random parameters of the right shapes: eval_shape plus numpy draws, nothing to compile.

    (Zero-initialised output layers would hide conditioning; random weights everywhere do not.)
    """
    x = jnp.zeros(shape)
    t = jnp.zeros((shape[0],))
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, t, **kw))
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype), shapes)


_JITTED = {}


def _apply(model, *args, **kw):
    """model.apply under jit, compiled once per model (a bound method is new at each access)."""
    if id(model) not in _JITTED:
        _JITTED[id(model)] = (model, jax.jit(model.apply, static_argnames=("train",)))
    return _JITTED[id(model)][1](*args, **kw)


def test_cifar10_preset_parameter_count():
    model = ddpm_cifar10_unet()
    x, t = jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,))
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, t))
    n = sum(x.size for x in jax.tree.leaves(shapes))
    assert n == pytest.approx(35.7e6, rel=0.01)


@pytest.mark.parametrize("size", [28, 32])
def test_output_shape_equals_input(size):
    model = UNet(**TINY)
    params = _init(model, (2, size, size, 1))
    out = jax.jit(model.apply)(params, jnp.ones((2, size, size, 1)), jnp.array([0.1, 0.9]))
    assert out.shape == (2, size, size, 1) and out.dtype == jnp.float32


def test_indivisible_input_is_a_clear_error():
    model = UNet(**{**TINY, "channel_mult": (1, 2, 2, 2)})
    with pytest.raises(ValueError, match=r"28x28 does not divide by 8.*data.image_size"):
        _init(model, (1, 28, 28, 1))


def test_bad_group_count_names_the_field():
    with pytest.raises(ValueError, match="model.num_groups"):
        _init(UNet(**{**TINY, "num_groups": 5}), (1, 16, 16, 1))


@pytest.mark.parametrize(
    "variant",
    [
        dict(downsample="avgpool", upsample="bilinear", activation="gelu"),
        dict(downsample="maxpool", upsample="nearest"),
        dict(downsample="rearrange", upsample="transpose"),
        dict(
            upsample="transpose", upsample_kernel=4, upsample_padding=1, upsample_output_padding=0
        ),
        dict(time_embedding="channel"),
    ],
)
def test_block_variants(variant):
    model = UNet(**{**TINY, **variant})
    params = _init(model, (2, 16, 16, 1))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 1))
    out0 = _apply(model, params, x, jnp.array([0.1, 0.1]))
    out1 = _apply(model, params, x, jnp.array([0.9, 0.9]))
    assert out0.shape == x.shape and bool(jnp.all(jnp.isfinite(out0)))
    assert float(jnp.max(jnp.abs(out0 - out1))) > 1e-4  # time reaches the output


def test_transpose_upsample_bad_geometry_is_an_error():
    up = Upsample(4, "transpose", kernel_size=3, stride=2, padding=1, output_padding=0)
    with pytest.raises(ValueError, match="output_padding"):
        up.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 4)))


def test_space_to_depth_matches_einops_layout():
    x = jnp.arange(2 * 4 * 4 * 3).reshape(2, 4, 4, 3)
    y = space_to_depth(x)
    assert y.shape == (2, 2, 2, 12)
    # 'b (h p1) (w p2) c -> b h w (c p1 p2)': channel index c*4 + p1*2 + p2.
    assert int(y[1, 1, 0, 2 * 4 + 1 * 2 + 1]) == int(x[1, 3, 1, 2])


def test_class_conditioning_and_null_token():
    model = UNet(**{**TINY, "num_classes": 10})
    params = _init(model, (3, 16, 16, 1), y=jnp.zeros((3,), jnp.int32))
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 16, 16, 1))
    t = jnp.full((3,), 0.5)
    out_a = _apply(model, params, x, t, y=jnp.array([0, 0, 0]))
    out_b = _apply(model, params, x, t, y=jnp.array([1, 1, 1]))
    out_null = _apply(model, params, x, t, y=jnp.array([10, 10, 10]))
    assert float(jnp.max(jnp.abs(out_a - out_b))) > 1e-4
    assert float(jnp.max(jnp.abs(out_a - out_null))) > 1e-4
    with pytest.raises(ValueError, match="null label is 10"):
        _apply(model, params, x, t)


def test_vector_conditioning_and_null_vector():
    model = UNet(**{**TINY, "cond_dim": 8})
    cond = jax.random.normal(jax.random.PRNGKey(2), (2, 8))
    params = _init(model, (2, 16, 16, 1), cond=cond)
    assert params["params"]["cond_null"].shape == (8,)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 1))
    t = jnp.full((2,), 0.5)
    keep = _apply(model, params, x, t, cond=cond, cond_mask=jnp.array([True, True]))
    drop = _apply(model, params, x, t, cond=cond, cond_mask=jnp.array([False, True]))
    assert float(jnp.max(jnp.abs(keep[0] - drop[0]))) > 1e-4
    np.testing.assert_allclose(keep[1], drop[1], atol=1e-6)  # rows are independent
    # Dropping a row gives the same output whatever its vector was.
    drop2 = _apply(model, params, x, t, cond=cond * 3.0, cond_mask=jnp.array([False, True]))
    np.testing.assert_allclose(drop[0], drop2[0], atol=1e-6)


def test_bfloat16_compute_float32_params():
    model = UNet(**{**TINY, "dtype": jnp.bfloat16, "dropout": 0.1})
    params = _init(model, (2, 16, 16, 1))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 1))
    out = jax.jit(
        lambda p, x: model.apply(
            p, x, jnp.full((2,), 0.3), train=True, rngs={"dropout": jax.random.PRNGKey(0)}
        )
    )(params, x)
    assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
    ref = _apply(UNet(**{**TINY, "dropout": 0.0}), params, x, jnp.full((2,), 0.3))
    bf = _apply(UNet(**{**TINY, "dtype": jnp.bfloat16}), params, x, jnp.full((2,), 0.3))
    assert float(jnp.max(jnp.abs(bf - ref))) < 0.05 * float(jnp.max(jnp.abs(ref))) + 1e-3
