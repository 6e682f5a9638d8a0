"""The U-Net's ablation switches model.norm and model.residual (notebooks/02_unet_ablation.py).

Defaults must be the network every checkpoint was trained as: the same parameter tree and
bit-equal outputs (checked against the pre-switch ResBlock, kept here as the reference);
the switches must change exactly what they name; bad values are refused by field name.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax_lab import api
from diffax_lab.errors import ConfigError
from diffax_lab.models import build_unet, layers
from diffax_lab.models.diffusers_config import DiffusersFormatError, lab_to_unet_config
from diffax_lab.models.layers import ACTIVATIONS, GroupNorm, ResBlock
from diffax_lab.models.unet import UNet
from diffax_lab.tasks import registry

SMALL = dict(
    base_channels=8,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(4,),
    num_groups=4,
    out_channels=1,
)
X = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 1))
T = jnp.array([0.1, 0.7])


class OldResBlock(nn.Module):
    """layers.ResBlock as it was before the switches (commit 5ee3cd7), verbatim."""

    features: int
    num_groups: int = 32
    dropout: float = 0.0
    activation: str = "silu"
    dtype: object = jnp.float32
    norm_eps: float = 1e-6

    @nn.compact
    def __call__(self, x, emb, *, train: bool):
        act = ACTIVATIONS[self.activation]
        h = act(GroupNorm(self.num_groups, self.dtype, self.norm_eps, name="norm1")(x))
        h = nn.Conv(self.features, (3, 3), dtype=self.dtype, name="conv1")(h)
        if emb is not None:
            h = (
                h
                + nn.Dense(self.features, dtype=self.dtype, name="emb_proj")(act(emb))[
                    :, None, None
                ]
            )
        h = act(GroupNorm(self.num_groups, self.dtype, self.norm_eps, name="norm2")(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = nn.Conv(
            self.features, (3, 3), dtype=self.dtype, kernel_init=nn.initializers.zeros, name="conv2"
        )(h)
        if x.shape[-1] != self.features:
            x = nn.Conv(self.features, (1, 1), dtype=self.dtype, name="skip")(x)
        return x + h


def _random(model):
    """Random parameters of the model's shapes (numpy draws: nothing to compile)."""
    rng = np.random.default_rng(0)
    return jax.tree.map(
        lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype), _shapes(model)
    )


def _shapes(model):
    """The parameter tree's shapes: nothing computed."""
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), X, T))


_JITTED: dict = {}


def _out(model, params):
    """model.apply under jit, compiled once per distinct model."""
    key = repr(model)
    if key not in _JITTED:
        _JITTED[key] = jax.jit(model.apply)
    return np.asarray(_JITTED[key](params, X, T))


def _program(model, params):
    """The traced forward pass: equal programs compute bit-equal outputs."""
    return str(jax.make_jaxpr(model.apply)(params, X, T))


def _perturbed(params):
    """Random non-zero weights everywhere (zero-initialised convs would hide differences)."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    return jax.tree.unflatten(
        tree, [a + 0.1 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys, strict=True)]
    )


def _paths(params):
    return sorted(jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(params))


def test_resblock_defaults_match_the_pre_switch_block(monkeypatch):
    # Bit-equal programs need the old block's convolution everywhere; the CPU's 1x1-as-a-dot
    # ("lab") is compared with nn.Conv in tests/test_conv_impl.py.
    monkeypatch.setitem(layers.CONV_IMPL_BY_BACKEND, jax.default_backend(), "xla")
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 4, 4, 4))
    emb = jax.random.normal(jax.random.PRNGKey(4), (2, 16))
    new, old = ResBlock(8, num_groups=4), OldResBlock(8, num_groups=4)
    p_new = jax.jit(lambda k: new.init(k, x, emb, train=False))(jax.random.PRNGKey(0))
    p_old = jax.jit(lambda k: old.init(k, x, emb, train=False))(jax.random.PRNGKey(0))
    assert jax.tree.structure(p_new) == jax.tree.structure(p_old)
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, p_new, p_old)))  # same init
    p = _perturbed(p_old)  # non-zero conv2 (zero-initialised, it would hide differences)
    out_new = jax.jit(lambda p: new.apply(p, x, emb, train=False))(p)
    out_old = jax.jit(lambda p: old.apply(p, x, emb, train=False))(p)
    assert np.array_equal(np.asarray(out_new), np.asarray(out_old))
    # Training: layers.Dropout draws nn.Dropout's keys and masks, so runs carry over.
    new, old = (B(8, num_groups=4, dropout=0.5) for B in (ResBlock, OldResBlock))
    rngs = {"dropout": jax.random.key(5)}
    out_new = jax.jit(lambda p: new.apply(p, x, emb, train=True, rngs=rngs))(p)
    out_old = jax.jit(lambda p: old.apply(p, x, emb, train=True, rngs=rngs))(p)
    out_eval = jax.jit(lambda p: new.apply(p, x, emb, train=False))(p)
    assert np.array_equal(np.asarray(out_new), np.asarray(out_old))
    assert not np.allclose(np.asarray(out_new), np.asarray(out_eval))


def test_unet_defaults_equal_the_explicit_defaults_and_the_config_without_the_fields():
    base = UNet(**SMALL)
    explicit = UNet(**SMALL, norm="group", residual=True)
    assert _paths(_shapes(explicit)) == _paths(_shapes(base))
    p = _random(base)
    assert _program(base, p) == _program(explicit, p)
    # A config from before the fields existed builds the same network.
    cfg = api.config("ddpm:tiny")
    old_cfg = api.config("ddpm:tiny")
    del old_cfg.model["norm"], old_cfg.model["residual"]
    assert build_unet(cfg) == build_unet(old_cfg)
    assert build_unet(api.config("ddpm:tiny", **{"model.norm": "none"})).norm == "none"


def test_norm_none_drops_every_groupnorm_and_changes_the_output():
    p = _random(UNet(**SMALL))
    model = UNet(**SMALL, norm="none")
    q = _shapes(model)
    norms = [k for k in _paths(p) if "norm" in k]
    assert any("norm_out" in k for k in norms) and any("attn" in k for k in norms)
    assert not [k for k in _paths(q) if "norm" in k]
    assert set(_paths(q)) == set(_paths(p)) - set(norms)  # nothing else changed
    out = _out(model, {"params": _drop_norms(p["params"])})
    assert np.isfinite(out).all()
    assert not np.allclose(out, _out(UNet(**SMALL), p))


def _drop_norms(tree):
    if not isinstance(tree, dict):
        return tree
    return {k: _drop_norms(v) for k, v in tree.items() if not k.startswith("norm")}


def test_residual_false_has_no_skip_path_and_trains_from_init():
    p, q = _shapes(UNet(**SMALL)), _shapes(UNet(**SMALL, residual=False))
    assert any("skip" in k for k in _paths(p)) and not any("skip" in k for k in _paths(q))
    assert set(_paths(q)) == {k for k in _paths(p) if "skip" not in k}
    # Without the skip, conv2 is not zero-initialised (a zero conv2 would output zeros and
    # pass no gradient back), so the block's first conv learns from the first step.
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 4, 4, 4))
    for residual in (True, False):
        block = ResBlock(8, num_groups=4, residual=residual)

        def grads(key, block=block):
            params = block.init(key, x, None, train=False)

            def loss(params):
                return jnp.mean((block.apply(params, x, None, train=False) - 1.0) ** 2)

            return params, jax.grad(loss)(params)

        params, g = jax.jit(grads)(jax.random.PRNGKey(0))
        conv2 = np.abs(np.asarray(params["params"]["conv2"]["kernel"])).max()
        conv1_grad = np.abs(np.asarray(g["params"]["conv1"]["kernel"])).max()
        assert (conv2 > 0) == (not residual) and (conv1_grad > 0) == (not residual)
    # The same weights without the skip give another function.
    p = _random(UNet(**SMALL))
    out = _out(UNet(**SMALL, residual=False), {"params": _drop_skips(p["params"])})
    assert np.isfinite(out).all() and not np.allclose(out, _out(UNet(**SMALL), p))


def _drop_skips(tree):
    if not isinstance(tree, dict):
        return tree
    return {k: _drop_skips(v) for k, v in tree.items() if k != "skip"}


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"norm": "batch"}, r"model\.norm must be one of \('group', 'none'\), got 'batch'"),
        ({"residual": "no"}, r"model\.residual must be True or False"),
        ({"norm": "none", "cross_attention_dim": 8}, r"model\.norm='none' needs"),
    ],
)
def test_bad_switch_values_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(lambda: UNet(**SMALL, **kw).init(jax.random.PRNGKey(0), X, T))


def test_config_check_names_the_field_before_anything_compiles():
    with pytest.raises(ConfigError, match=r"config\.model\.norm='layer' must be one of"):
        registry.check_config(api.config("ddpm:tiny", **{"model.norm": "layer"}))
    with pytest.raises(ConfigError, match=r"model\.residual"):
        api.config("ddpm:tiny", **{"model.residual": "maybe"})
    registry.check_config(api.config("ddpm:tiny", **{"model.norm": "none"}))  # accepted


@pytest.mark.parametrize(
    "kw,match", [({"norm": "none"}, r"model\.norm"), ({"residual": False}, r"model\.residual")]
)
def test_diffusers_export_refuses_the_switches_by_name(kw, match):
    model = UNet(**{**SMALL, "attention_resolutions": ()})
    assert lab_to_unet_config(model, 1, 8)["_class_name"] == "UNet2DModel"
    with pytest.raises(DiffusersFormatError, match=match):
        lab_to_unet_config(UNet(**{**SMALL, "attention_resolutions": ()}, **kw), 1, 8)
