"""Microbenchmarks of the lab's CPU arrangements against what they replaced, on the shapes
of configs/ddpm.py's tiny and cpu U-Nets (ms per call, median of --iters after warm-up):

    python -m benchmarks.cpu_layers [--iters=30]

- GroupNorm + SiLU, forward and forward + backward: Flax's ``nn.GroupNorm`` against
  ``layers.GroupNorm`` (its hand-written backward where the table selects it);
- attention forward: ``jax.nn.dot_product_attention`` against ``layers.dot_product_attention``
  with impl "lab" (the last shape is the cpu config's middle block at batch 64, which runs
  in slices);
- nearest 2x upsampling: ``jax.image.resize`` against ``layers.nearest_2x`` (a broadcast);
- the batch order: ``jax.random.permutation`` of N (what every step sorted twice) against
  ``pipeline.batch_indices`` (B indices of a keyed shuffle).
"""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks.common_flags import print_json

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_integer("iters", 30, "Timed calls after warm-up.")


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
    from diffax_lab.data import pipeline
    from diffax_lab.models import layers

    it = FLAGS.iters
    key = jax.random.PRNGKey(0)
    out = {"jax": jax.__version__, "backend": jax.default_backend()}
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
    print_json(out)


if __name__ == "__main__":
    define_flags()
    app.run(main)
