"""Microbenchmarks of the lab's CPU arrangements against what they replaced, on the shapes
of configs/ddpm.py's tiny and cpu U-Nets (ms per call, median of --iters after warm-up):

    python -m benchmarks.cpu_layers [--iters=30]

- GroupNorm + SiLU, forward and forward + backward: Flax's ``nn.GroupNorm`` against
  ``layers.GroupNorm`` (its hand-written backward where the table selects it);
- attention forward: ``jax.nn.dot_product_attention`` against ``layers.dot_product_attention``
  with impl "lab" (the last shape is the cpu config's middle block at batch 64, which runs
  in slices);
- dropout at rate 0.1, forward and forward + backward: ``nn.Dropout`` (jax.random's
  Threefry, a rolled loop on XLA:CPU) against ``layers.Dropout`` (the same mask from an
  unrolled Threefry that fuses);
- nearest 2x upsampling: ``jax.image.resize`` against ``layers.nearest_2x`` (a broadcast);
- the batch order: ``jax.random.permutation`` of N (what every step sorted twice) against
  ``pipeline.batch_indices`` (B indices of a keyed shuffle);
- with ``--peer`` (torch + diffusers), ours (compiled with the lab's options) against
  PyTorch eager on the tiny config's shapes: a whole attention block (GroupNorm, q/k/v,
  attention, output projection, residual; diffusers' ``Attention``, the peer U-Net's
  block, with PyTorch's fused SDPA), GroupNorm + SiLU, and the skip concatenation of the
  decoder (32 + 16 channels), forward and forward + backward of a sum of squares.
"""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks.common_flags import configure_runtime, define_runtime_flag, print_json

FLAGS = flags.FLAGS


def define_flags():
    define_runtime_flag()
    flags.DEFINE_integer("iters", 30, "Timed calls after warm-up.")
    flags.DEFINE_bool(
        "peer", True, "Also time an attention block, GroupNorm + SiLU and a concat in PyTorch."
    )
    flags.DEFINE_integer("threads", 2, "torch.set_num_threads for --peer (0 = torch's default).")


def median_ms(fn, *args, iters: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def main(argv):
    del argv
    runtime = configure_runtime()
    from diffax_lab.data import pipeline
    from diffax_lab.models import layers

    it = FLAGS.iters
    key = jax.random.PRNGKey(0)
    out = {"jax": jax.__version__, "backend": jax.default_backend(), "cpu_runtime": runtime}
    for shape in [(16, 32, 32, 16), (32, 28, 28, 32), (256, 32, 32, 16)]:
        x = jax.random.normal(key, shape) * 2 + 1
        row = {}
        for name, mod in (("flax", nn.GroupNorm(8, epsilon=1e-6)), ("lab", layers.GroupNorm(8))):
            p = mod.init(key, x)
            fwd = jax.jit(lambda p, x, m=mod: nn.silu(m.apply(p, x)))
            grad = jax.jit(
                jax.grad(lambda p, x, m=mod: jnp.sum(nn.silu(m.apply(p, x)) ** 2), (0, 1))
            )
            row[f"{name}_fwd"] = median_ms(fwd, p, x, iters=it)
            row[f"{name}_fwd_bwd"] = median_ms(grad, p, x, iters=it)
        out[f"group_norm_silu {shape}"] = row
    for shape in [(16, 256, 1, 32), (64, 256, 1, 32), (64, 196, 4, 16)]:
        q, k, v = (jax.random.normal(jax.random.fold_in(key, i), shape) for i in range(3))
        out[f"attention {shape}"] = {
            impl: median_ms(
                jax.jit(lambda q, k, v, i=impl: layers.dot_product_attention(q, k, v, impl=i)),
                q,
                k,
                v,
                iters=it,
            )  # fmt: skip
            for impl in ("xla", "lab")
        }
    for shape in [(16, 32, 32, 16), (16, 16, 16, 32)]:
        x = jax.random.normal(key, shape)
        row = {}
        for name, mod in (("flax", nn.Dropout(0.1)), ("lab", layers.Dropout(0.1))):
            rngs = {"dropout": jax.random.key(1)}
            fwd = jax.jit(lambda x, m=mod, r=rngs: m.apply({}, x, False, rngs=r))
            grad = jax.jit(
                jax.grad(lambda x, m=mod, r=rngs: jnp.sum(m.apply({}, x, False, rngs=r) ** 2))
            )
            row[f"{name}_fwd"] = median_ms(fwd, x, iters=it)
            row[f"{name}_fwd_bwd"] = median_ms(grad, x, iters=it)
        out[f"dropout {shape}"] = row
    x = jax.random.normal(key, (64, 14, 14, 64))
    resize = jax.jit(lambda x: jax.image.resize(x, (64, 28, 28, 64), "nearest"))
    out["nearest_upsample (64, 14, 14, 64)"] = {
        "image_resize": median_ms(resize, x, iters=it),
        "nearest_2x": median_ms(jax.jit(layers.nearest_2x), x, iters=it),
    }
    for n in (1024, 60_000):
        perm = jax.jit(lambda k, n=n: jax.random.permutation(k, n))
        batch = jax.jit(pipeline.batch_indices, static_argnums=(2, 3))
        out[f"batch_order N={n}, B=32"] = {
            "one_permutation": median_ms(perm, key, iters=it),
            "batch_indices": median_ms(batch, key, 5, n, 32, iters=it),
        }
    if FLAGS.peer:
        import torch

        if FLAGS.threads:
            torch.set_num_threads(FLAGS.threads)
        out["attention_block (16, 16, 16, 32), 1 head"] = attention_block_vs_diffusers(it)
        out.update(elementwise_vs_pytorch(it))
    print_json(out)


def _ours_and_torch(fn, torch_fn, args, torch_args, iters: int) -> dict:
    """ms per call of ``fn`` (jitted with the lab's options) and ``torch_fn`` in PyTorch
    eager, forward and forward + backward of the sum of squares of the output."""
    from diffax_lab import compilation

    def loss(*a):
        return jnp.sum(fn(*a) ** 2)

    grad = jax.grad(loss, argnums=tuple(range(len(args))))
    fwd = compilation.compile_with_options(jax.jit(fn).lower(*args))
    bwd = compilation.compile_with_options(jax.jit(grad).lower(*args), training=True)
    import torch

    def torch_fwd():
        with torch.no_grad():
            return torch_fn(*torch_args)

    def torch_fwd_bwd():
        (torch_fn(*torch_args) ** 2).sum().backward()

    return {
        "lab_fwd": median_ms(fwd, *args, iters=iters),
        "lab_fwd_bwd": median_ms(bwd, *args, iters=iters),
        "torch_fwd": median_ms(torch_fwd, iters=iters),
        "torch_fwd_bwd": median_ms(torch_fwd_bwd, iters=iters),
    }


def elementwise_vs_pytorch(iters: int) -> dict:
    import torch

    from diffax_lab.models import layers

    F = torch.nn.functional
    key = jax.random.PRNGKey(0)
    out = {}
    x = jax.random.normal(key, (16, 32, 32, 48)) * 2 + 1
    norm = layers.GroupNorm(8)
    p = norm.init(key, x)
    xt = torch.randn(16, 48, 32, 32, requires_grad=True)
    w, b = torch.ones(48, requires_grad=True), torch.zeros(48, requires_grad=True)
    out["group_norm_silu vs torch (16, 32, 32, 48)"] = _ours_and_torch(
        lambda p, x: nn.silu(norm.apply(p, x)),
        lambda x, w, b: F.silu(F.group_norm(x, 8, w, b, 1e-6)),
        (p, x),
        (xt, w, b),
        iters,
    )
    a, c = jax.random.normal(key, (16, 32, 32, 32)), jax.random.normal(key, (16, 32, 32, 16))
    at = torch.randn(16, 32, 32, 32, requires_grad=True)
    ct = torch.randn(16, 16, 32, 32, requires_grad=True)
    out["skip concatenation vs torch 32 + 16 channels at (16, 32, 32)"] = _ours_and_torch(
        lambda a, c: jnp.concatenate([a, c], -1),
        lambda a, c: torch.cat([a, c], 1),
        (a, c),
        (at, ct),
        iters,
    )
    return out


def attention_block_vs_diffusers(iters: int) -> dict:
    """ms per call: ``layers.AttentionBlock`` and diffusers' ``Attention`` (torch_*)."""
    import torch
    from diffusers.models.attention_processor import Attention

    from diffax_lab.models import layers

    b, h, c = 16, 16, 32
    x = jax.random.normal(jax.random.PRNGKey(0), (b, h, h, c))
    block = layers.AttentionBlock(num_heads=1, num_groups=8)
    params = jax.tree.map(lambda a: a + 0.01, block.init(jax.random.PRNGKey(1), x))
    theirs = Attention(
        c, heads=1, dim_head=c, norm_num_groups=8, residual_connection=True, bias=True,
        upcast_softmax=True, _from_deprecated_attn_block=True,
    )  # fmt: skip
    xt = torch.randn(b, c, h, h, requires_grad=True)
    return _ours_and_torch(block.apply, theirs, (params, x), (xt,), iters)


if __name__ == "__main__":
    define_flags()
    app.run(main)
