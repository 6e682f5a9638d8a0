"""On-device batching: the batch at step s is a pure function of (data key, s).

The dataset sits on the device once, as uint8; each train step gathers its batch inside
the jitted step. Batches walk through one random permutation per epoch (sampling without
replacement), so a resumed run sees exactly the batches an uninterrupted one would.

Host-sharded input (``data.num_shards = k > 0``): the train split is cut into k contiguous
index ranges (``shard_ranges``), each process reads only the shards its devices feed, and
the batch at step s is shard 0's B / k examples, then shard 1's, ... each shard walking its
own permutations (key ``fold_in(data key, shard)``). The order is a function of (seed, s,
k) alone, never of the number of processes, so it carries no state for a checkpoint to
hold: a run resumed on another number of hosts (k fixed) sees the same batches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_SHUFFLE_ROUNDS = 8


def _mix32(x):
    """A bijective 32-bit integer hash (Wellons' lowbias32): two multiply-xorshift rounds."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def shuffled_index(round_keys, index, num_examples: int):
    """perm[index] of the random permutation of [0, N) that ``round_keys`` [..., R] (uint32)
    pick, for any array of indices, without forming perm: O(len(index)), not O(N log N).

    A keyed Feistel network is a bijection of [0, 4^h) (4^h >= N, h bits a half); walking
    each index's cycle until it falls below N again restricts it to a bijection of [0, N)
    ("cycle walking"; the walk always ends, at most 4^h / N steps expected). This is the
    construction of TensorFlow's ``index_shuffle`` and grain's index sampler; the round
    function is a 32-bit mix of the right half with the round key.
    """
    n = num_examples
    half = max(1, (max(n - 1, 1).bit_length() + 1) // 2)
    mask = jnp.uint32((1 << half) - 1)

    def encrypt(x):
        left, right = x >> half, x & mask
        for r in range(round_keys.shape[-1]):
            left, right = right, left ^ (_mix32(right ^ round_keys[..., r]) & mask)
        return (left << half) | right

    x = encrypt(jnp.asarray(index).astype(jnp.uint32))
    x = jax.lax.while_loop(lambda x: jnp.any(x >= n), lambda x: jnp.where(x >= n, encrypt(x), x), x)
    return x.astype(jnp.int32)


def epoch_round_keys(key, epoch):
    """The shuffle's round keys [..., R] of epoch(s) ``epoch``: bits of fold_in(key, epoch)."""

    def one(e):
        return jax.random.bits(jax.random.fold_in(key, e), (_SHUFFLE_ROUNDS,), jnp.uint32)

    epoch = jnp.asarray(epoch, jnp.int32)
    return jax.vmap(one)(epoch.reshape(-1)).reshape(*epoch.shape, _SHUFFLE_ROUNDS)


def batch_indices(key, step, num_examples: int, batch_size: int):
    """Indices [B] of the examples in batch ``step``: epoch e visits the examples in the
    order of the random permutation that fold_in(key, e) picks (``shuffled_index``), each
    once. Only the B indices of the batch are computed; until 2026-12 each step sorted two
    whole permutations of N keys (19.6 ms each at N = 60,000 on the 2-core CPU,
    benchmarks/cpu_layers.py).

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
    keys = epoch_round_keys(key, jnp.stack([first, first + 1]))  # [2, R]
    return shuffled_index(jnp.where((epoch == first)[:, None], keys[0], keys[1]), offset, n)


def shard_ranges(num_examples: int, num_shards: int) -> list[tuple[int, int]]:
    """[start, stop) of each of ``num_shards`` contiguous shards (sizes differ by at most
    one; disjoint and together all examples). ``num_shards = 0``: one shard of all."""
    k = max(num_shards, 1)
    return [(s * num_examples // k, (s + 1) * num_examples // k) for s in range(k)]


def sharded_batch_indices(key, step, shard_sizes: tuple[int, ...], batch_size: int):
    """Indices [B] into the concatenated shards of the examples in batch ``step``: B / k
    from each shard, by ``batch_indices`` with the shard's own key. One shard: exactly
    ``batch_indices(key, ...)`` (the single global order)."""
    if len(shard_sizes) == 1:
        return batch_indices(key, step, shard_sizes[0], batch_size)
    per = batch_size // len(shard_sizes)
    parts, offset = [], 0
    for s, n in enumerate(shard_sizes):
        parts.append(offset + batch_indices(jax.random.fold_in(key, s), step, n, per))
        offset += n
    return jnp.concatenate(parts)


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
