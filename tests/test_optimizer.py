"""The train step's update on one flat vector equals the update per leaf
(diffax_lab/optimizer.py), and the layout is chosen and refused as documented."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax_lab import optimizer
from diffax_lab.errors import ConfigError
from tests.helpers import load_config


def _tree(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "conv": {"kernel": jax.random.normal(k1, (3, 3, 2, 4)), "bias": jnp.zeros((4,))},
        "dense": {"kernel": jax.random.normal(k2, (4, 5)) * 3.0},
        "scale": jax.random.normal(k3, ()),
    }


def _optim(**fields):
    c = load_config("ddpm.py", "tiny").optim
    c.warmup_steps, c.weight_decay, c.grad_clip = 0, 0.01, 1.0
    for k, v in fields.items():
        setattr(c, k, v)
    return c


@pytest.mark.parametrize("kind", ["adamw", "adam"])
def test_flat_update_equals_tree_update_over_steps(kind):
    tx, _ = optimizer.make_optimizer(_optim(optimizer=kind), num_steps=10)
    params = _tree(jax.random.PRNGKey(0))
    state = {"tree": (params, tx.init(params), params), "flat": (params, tx.init(params), params)}
    for step in range(4):  # gradients large enough that clipping acts
        grads = jax.tree.map(lambda x, s=step: 5.0 * x + s, _tree(jax.random.PRNGKey(step + 1)))
        for layout, update in optimizer.UPDATES.items():
            p, o, e = state[layout]
            p, o, e, norm, finite = jax.jit(update, static_argnums=(0, 1))(
                tx, 0.9, p, grads, o, e, jnp.float32(1.0)
            )
            assert bool(finite)
            state[layout] = (p, o, e)
            expected_norm = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads)))
            np.testing.assert_allclose(norm, expected_norm, rtol=1e-5)
    tree, flat = state["tree"], state["flat"]
    # the same structure (a checkpoint of either restores into the other) ...
    assert jax.tree.structure(tree) == jax.tree.structure(flat)
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(flat), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        # ... and the same values up to the order of the global norm's float32 sum
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), tree[0], params)
    assert min(jax.tree.leaves(moved)) > 0  # every leaf was updated


@pytest.mark.parametrize("layout", ["flat", "tree"])
@pytest.mark.parametrize("bad", ["loss", "grad"])
def test_a_non_finite_step_leaves_everything_as_it_was(layout, bad):
    tx, _ = optimizer.make_optimizer(_optim(), num_steps=10)
    params = _tree(jax.random.PRNGKey(0))
    opt_state, ema = tx.init(params), jax.tree.map(lambda x: x + 1.0, params)
    grads = _tree(jax.random.PRNGKey(1))
    loss = jnp.float32(1.0)
    if bad == "loss":
        loss = jnp.float32(jnp.nan)
    else:
        grads["dense"]["kernel"] = grads["dense"]["kernel"].at[0, 0].set(jnp.inf)
    out = optimizer.UPDATES[layout](tx, 0.9, params, grads, opt_state, ema, loss)
    assert not bool(out[4])
    before = jax.tree.leaves((params, opt_state, ema))
    for new, old in zip(jax.tree.leaves(out[:3]), before, strict=True):
        np.testing.assert_array_equal(new, old)


def test_layout_resolution_and_refusals():
    config = load_config("ddpm.py", "tiny")
    abstract = jax.eval_shape(lambda: _tree(jax.random.PRNGKey(0)))
    assert config.optim.update_layout == "auto"
    expected_auto = "flat" if jax.default_backend() == "cpu" else "tree"
    assert optimizer.resolve_layout(config, abstract, params_replicated=True) == expected_auto
    assert optimizer.resolve_layout(config, abstract, params_replicated=False) == "tree"
    config.optim.update_layout = "tree"
    assert optimizer.resolve_layout(config, abstract, params_replicated=True) == "tree"
    config.optim.update_layout = "flat"
    with pytest.raises(ConfigError, match=r"optim.update_layout='flat'.*fsdp"):
        optimizer.resolve_layout(config, abstract, params_replicated=False)
    mixed = {**abstract, "scale": jax.ShapeDtypeStruct((), jnp.bfloat16)}
    with pytest.raises(ConfigError, match=r"one floating dtype.*bfloat16"):
        optimizer.resolve_layout(config, mixed, params_replicated=True)
    config.optim.update_layout = "auto"  # auto falls back to per leaf instead
    assert optimizer.resolve_layout(config, mixed, params_replicated=True) == "tree"
    config.optim.update_layout = "diagonal"
    with pytest.raises(ConfigError, match=r"config.optim.update_layout='diagonal'"):
        optimizer.check_layout(config)


def test_the_tasks_train_step_uses_the_resolved_layout():
    from diffax_lab.sharding import make_mesh
    from diffax_lab.tasks import registry

    config = load_config("ddpm.py", "tiny")
    task = registry.build(config, make_mesh(1))
    assert task.update_layout == ("flat" if jax.default_backend() == "cpu" else "tree")
    config.optim.update_layout = "tree"
    assert registry.build(config, make_mesh(1)).update_layout == "tree"


def test_flat_update_of_a_single_array_keeps_the_step_count_apart():
    """A one-leaf parameter tree: only subtrees with the parameters' shapes are raveled
    (Adam's scalar step count is a leaf too, but not of that shape)."""
    tx, _ = optimizer.make_optimizer(_optim(), num_steps=10)
    params = jnp.arange(6.0).reshape(2, 3)
    grads = jnp.ones((2, 3))
    out = {
        layout: update(tx, 0.9, params, grads, tx.init(params), params, jnp.float32(0.5))
        for layout, update in optimizer.UPDATES.items()
    }
    assert jax.tree.structure(out["flat"]) == jax.tree.structure(out["tree"])
    for a, b in zip(jax.tree.leaves(out["flat"]), jax.tree.leaves(out["tree"]), strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-6)
