"""On-device batching: the batch at step s is a pure function of (data key, s).

The dataset sits on the device once, as uint8; each train step gathers its batch inside
the jitted step. Batches walk through one random permutation per epoch (sampling without
replacement), so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def batch_indices(key, step, num_examples: int, batch_size: int):
    """Indices [B] of the examples in batch ``step``; epoch e is the permutation fold_in(key, e).

    Global position p = step * B + j is split without forming step * B (int32 overflow):
    with step = q N + r, p // N = q B + (r B + j) // N and p % N = (r B + j) % N.
    """
    n, b = num_examples, batch_size
    step = jnp.asarray(step, jnp.int32)
    q, r = step // n, step % n
    within = r * b + jnp.arange(b, dtype=jnp.int32)  # < N (B + 1), fits when B <= N
    epoch, offset = q * b + within // n, within % n
    first = epoch[0]
    # A batch spans at most two epochs when batch_size <= num_examples (validated earlier).
    perm0 = jax.random.permutation(jax.random.fold_in(key, first), n)
    perm1 = jax.random.permutation(jax.random.fold_in(key, first + 1), n)
    return jnp.where(epoch == first, perm0[offset], perm1[offset])


def to_model_range(images_uint8):
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images_uint8.astype(jnp.float32) / 127.5 - 1.0


def to_uint8(images):
    """float [-1, 1] -> uint8 [0, 255], clipping."""
    return jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def random_flip(key, images):
    """Flips each image [B, H, W, C] left-right with probability 1/2."""
    flip = jax.random.bernoulli(key, 0.5, (images.shape[0], 1, 1, 1))
    return jnp.where(flip, images[:, :, ::-1, :], images)
