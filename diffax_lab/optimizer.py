"""The optimizer and the update every task's train step applies: clip, Adam(W), EMA and the
non-finite guard, computed per parameter leaf or on one flat vector.

Why two layouts of one update. The update is elementwise, so XLA emits a few kernels per
parameter leaf for each of its parts (Adam's moments, the step, the EMA, the finite check,
the guard's selects): for the tiny U-Net's 128 leaves, more than half of the train step's
lowered program (12,273 ops per leaf, 5,690 flat). XLA:CPU compiles every kernel on its
own, and that dominated the step's compile: 28.9 s cold with XLA's defaults (16.2 s with
the tests' flags), against 8.5 s (2.3 s) with the update on one vector (docs/BENCHMARKS.md,
"Compile time and the persistent cache"). ``optim.update_layout``:

- ``"flat"``: params, gradients, EMA and the optimizer's per-parameter state are
  concatenated (``jax.flatten_util.ravel_pytree``) into one vector each inside the step,
  updated, and split back. The stored state keeps the parameters' tree (checkpoints,
  shardings and exports do not change), and the maths is the same element by element; only
  the global norm sums its squares in another order (float32 rounding).
- ``"tree"``: per leaf. Needed where the parameters are sharded (``train.fsdp > 1``): the
  concatenation would gather every shard on every device.
- ``"auto"`` (the default): ``flat`` on the CPU backend with replicated parameters,
  ``tree`` otherwise (on GPUs: not measured, and the concatenation adds memory traffic).

The flat layout is right only for updates that treat every parameter alike: Adam or AdamW
without a mask and clipping by the global norm, the ones ``make_optimizer`` builds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from diffax_lab.config_lib import check_choice
from diffax_lab.errors import ConfigError

LAYOUTS = ("auto", "flat", "tree")


def decay_horizon(optim_config, num_steps: int) -> int:
    """Steps over which a cosine schedule decays: optim.decay_steps, else train.num_steps."""
    return optim_config.get("decay_steps", 0) or num_steps


def make_lr_schedule(optim_config, num_steps: int):
    c = optim_config
    warmup = optax.linear_schedule(0.0, c.lr, max(c.warmup_steps, 1))
    if c.lr_schedule == "cosine":
        horizon = decay_horizon(c, num_steps)
        after = optax.cosine_decay_schedule(c.lr, max(horizon - c.warmup_steps, 1))
    else:
        after = optax.constant_schedule(c.lr)
    return optax.join_schedules([warmup, after], [c.warmup_steps])


def make_optimizer(optim_config, num_steps: int):
    c = optim_config
    lr = make_lr_schedule(c, num_steps)
    if c.optimizer == "adamw":
        opt = optax.adamw(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay)
    else:
        opt = optax.adam(lr, b1=c.b1, b2=c.b2, eps=c.eps)
    parts = [optax.clip_by_global_norm(c.grad_clip)] if c.grad_clip > 0 else []
    return optax.chain(*parts, opt), lr


def tree_all_finite(tree):
    """One boolean: every element of every floating leaf is finite."""
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(x.dtype, jnp.floating)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def check_layout(config) -> None:
    check_choice(config, "optim.update_layout", LAYOUTS)


def resolve_layout(config, abstract_params, params_replicated: bool) -> str:
    """``optim.update_layout`` made concrete ("flat" or "tree") for these parameters;
    ConfigError where "flat" cannot apply."""
    layout = config.optim.get("update_layout", "auto")
    dtypes = {x.dtype for x in jax.tree.leaves(abstract_params)}
    one_float_dtype = len(dtypes) == 1 and jnp.issubdtype(next(iter(dtypes)), jnp.floating)
    if layout == "auto":
        cpu = jax.default_backend() == "cpu"
        return "flat" if cpu and params_replicated and one_float_dtype else "tree"
    if layout == "flat" and not params_replicated:
        raise ConfigError(
            "config.optim.update_layout='flat' concatenates the parameters on every device, "
            "which undoes train.fsdp > 1: use 'tree' (or 'auto') with sharded parameters."
        )
    if layout == "flat" and not one_float_dtype:
        raise ConfigError(
            f"config.optim.update_layout='flat' needs parameters of one floating dtype, not "
            f"{sorted(str(d) for d in dtypes)}: use 'tree' (or 'auto')."
        )
    return layout


def tree_update(tx, decay: float, params, grads, opt_state, ema, loss):
    """One step of ``tx`` and the EMA, and the non-finite guard: a step whose loss,
    gradients or new parameters are not finite returns params, EMA and optimizer state as
    they were. -> (params, opt_state, ema, grad_norm, finite)."""
    grad_norm = optax.tree_utils.tree_norm(grads)
    updates, new_opt = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    new_ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, new_params)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & tree_all_finite(new_params)

    def keep(new, old):
        return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

    return (
        keep(new_params, params),
        keep(new_opt, opt_state),
        keep(new_ema, ema),
        grad_norm,
        finite,
    )


def flat_update(tx, decay: float, params, grads, opt_state, ema, loss):
    """``tree_update`` on one vector per tree: the parameters, gradients, EMA and every
    subtree of the optimizer state shaped like the parameters (Adam's moments) are raveled
    in, updated, and unraveled out; the state keeps its tree structure."""
    treedef = jax.tree.structure(params)
    shapes = [x.shape for x in jax.tree.leaves(params)]

    def like_params(node) -> bool:  # a subtree of the parameters' structure and shapes
        return (
            jax.tree.structure(node) == treedef
            and [x.shape for x in jax.tree.leaves(node)] == shapes
        )

    flat_params, unravel = ravel_pytree(params)

    def ravel_state(state):
        return jax.tree.map(
            lambda n: ravel_pytree(n)[0] if like_params(n) else n, state, is_leaf=like_params
        )

    def unravel_state(template, flat):
        return jax.tree.map(
            lambda t, f: unravel(f) if like_params(t) else f, template, flat, is_leaf=like_params
        )

    new_params, new_opt, new_ema, grad_norm, finite = tree_update(
        tx,
        decay,
        flat_params,
        ravel_pytree(grads)[0],
        ravel_state(opt_state),
        ravel_pytree(ema)[0],
        loss,
    )
    return (
        unravel(new_params),
        unravel_state(opt_state, new_opt),
        unravel(new_ema),
        grad_norm,
        finite,
    )


UPDATES = {"flat": flat_update, "tree": tree_update}
