"""U-Net building blocks (Flax Linen, NHWC): the pieces diffusion courses teach, each selectable.

- ``sinusoidal_embedding``: the Transformer/DDPM time embedding (with diffusers'
  ``flip_sin_to_cos`` and ``freq_shift`` variants).
- ``Downsample``: strided conv, average or max pooling, or rearrange pooling (space-to-depth,
  then a convolution).
- ``Upsample``: nearest or bilinear resize followed by a convolution, or a transposed
  convolution with PyTorch's (kernel, stride, padding, output_padding) semantics.
- ``ResBlock``: GroupNorm -> activation -> conv, plus an embedding projection, twice, and
  the skip path; ``norm="none"`` drops the norms and ``residual=False`` the skip path (the
  course's plain two-conv block), for ablations.
- ``AttentionBlock``: multi-head self-attention over pixels via ``dot_product_attention``
  (jax.nn's, or on the CPU the lab's faster arrangement of the same maths).

Parameters are float32; ``dtype`` is the compute dtype (bfloat16 for speed). GroupNorm
statistics are always computed in float32.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS = {
    "silu": nn.silu,
    "gelu": nn.gelu,  # tanh approximation (Flax's default)
    "gelu_exact": functools.partial(nn.gelu, approximate=False),  # erf form (torch.nn.GELU)
    "relu": nn.relu,
    "mish": lambda x: x * jnp.tanh(nn.softplus(x)),  # Misra 2019
}
DOWNSAMPLES = ("conv", "avgpool", "maxpool", "rearrange")
NORMS = ("group", "none")  # model.norm: GroupNorm everywhere, or no normalisation at all
UPSAMPLES = ("nearest", "bilinear", "transpose")


def sinusoidal_embedding(
    t,
    dim: int,
    max_period: float = 10000.0,
    flip_sin_to_cos: bool = False,
    freq_shift: float = 1.0,
):
    """[B] -> [B, dim]: sin and cos of t at geometrically spaced frequencies.

    Frequency k of the half = dim // 2 is max_period^(-k / (half - freq_shift)). The defaults
    (sin first, freq_shift = 1) are DDPM's; diffusers' ``get_timestep_embedding`` has the
    same two knobs (``flip_sin_to_cos`` puts cos first; Stable Diffusion uses True, 0).
    """
    half = dim // 2
    denom = half - freq_shift
    if denom <= 0:  # a 2- or 3-dim embedding: one frequency, whatever the shift
        denom = 1.0
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / denom)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    parts = [jnp.cos(args), jnp.sin(args)] if flip_sin_to_cos else [jnp.sin(args), jnp.cos(args)]
    emb = jnp.concatenate(parts, axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def nearest_2x(x):
    """[B, H, W, C] -> [B, 2H, 2W, C], each pixel repeated 2x2: jax.image.resize's "nearest"
    values by a broadcast (resize is a gather on XLA:CPU; benchmarks/cpu_layers.py)."""
    b, h, w, c = x.shape
    return jnp.broadcast_to(x[:, :, None, :, None], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)


def space_to_depth(x, factor: int = 2):
    """[B, H, W, C] -> [B, H/f, W/f, C f^2]: einops 'b (h p1) (w p2) c -> b h w (c p1 p2)'."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // factor, factor, w // factor, factor, c)
    return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, h // factor, w // factor, c * factor * factor)


# Convolution implementation per backend, read at trace time by ``Conv(impl="auto")``.
# im2col + dot measured 1.2-8x SLOWER than XLA's convolution on XLA:CPU (jaxlib 0.10, the
# tiny/cpu configs' shapes, fwd and fwd+bwd; docs/BENCHMARKS.md "Speed and scale"). "lab"
# runs 1x1 convolutions as one dot and keeps XLA's for the rest: XLA:CPU computes a 1x1
# kernel gradient as a convolution with an image-sized window, up to 3.7x slower than the
# dot (benchmarks/conv_cap.py --pieces, docs/BENCHMARKS.md). GPUs and TPUs keep XLA's.
CONV_IMPL_BY_BACKEND: dict[str, str] = {"cpu": "lab", "gpu": "xla", "tpu": "xla"}

# Convolution implementations beyond the built-in ones, by name, for ``Conv(impl=name)`` or
# a ``CONV_IMPL_BY_BACKEND`` entry: ``fn(x, kernel, strides, pads, precision) -> y`` for an
# NHWC x, HWIO kernel, 2-D strides and explicit (lo, hi) pads, no dilation, one group
# (``conv_from_pieces`` builds one from its training pieces). Like "lab", 1x1
# convolutions stay one dot. benchmarks/onednn_ffi.py (PyTorch's oneDNN)
# and benchmarks/xla_onednn.py (XLA:CPU's own oneDNN thunk) register oneDNN's convolutions
# this way, without a change to the model code.
CONV_IMPLS: dict[str, Callable] = {}
_BUILTIN_CONV_IMPLS = ("xla", "im2col", "lab")


def register_conv_impl(name: str, fn: Callable) -> None:
    """Makes ``fn`` (the signature of ``CONV_IMPLS``) the convolution ``impl=name``."""
    if name in _BUILTIN_CONV_IMPLS or name == "auto":
        raise ValueError(f"Conv impl {name!r} is built in; register another name.")
    CONV_IMPLS[name] = fn


def xla_conv(x, kernel, strides, pads, precision=None):
    """XLA's convolution of an NHWC ``x`` and HWIO ``kernel`` with explicit (lo, hi) pads."""
    return jax.lax.conv_general_dilated(
        x, kernel, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision
    )


def conv_from_pieces(
    forward: Callable | None = None,
    input_grad: Callable | None = None,
    kernel_grad: Callable | None = None,
) -> Callable:
    """A convolution (the ``CONV_IMPLS`` signature) whose training pieces are the given
    functions: ``forward(x, kernel, strides, pads)``, ``input_grad(g, kernel, x_shape,
    strides, pads)`` and ``kernel_grad(x, g, kernel_shape, strides, pads)``, joined by a
    custom VJP. A piece that is None, or returns None for a convolution it does not take,
    is XLA's (``xla_conv`` and its VJP) for that convolution."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
    def conv(x, kernel, strides, pads, precision):
        return _fwd(x, kernel, strides, pads, precision)[0]

    def _fwd(x, kernel, strides, pads, precision):
        y = forward(x, kernel, strides, pads) if forward else None
        if y is None:
            y = xla_conv(x, kernel, strides, pads, precision)
        return y, (x, kernel)

    def _bwd(strides, pads, precision, res, g):
        x, kernel = res
        dx = input_grad(g, kernel, x.shape, strides, pads) if input_grad else None
        if dx is None:
            dx = jax.vjp(lambda x: xla_conv(x, kernel, strides, pads, precision), x)[1](g)[0]
        dw = kernel_grad(x, g, kernel.shape, strides, pads) if kernel_grad else None
        if dw is None:
            dw = jax.vjp(lambda k: xla_conv(x, k, strides, pads, precision), kernel)[1](g)[0]
        return dx, dw

    conv.defvjp(_fwd, _bwd)

    def impl(x, kernel, strides, pads, precision):
        strides = tuple(int(s) for s in strides)
        pads = tuple(tuple(int(p) for p in pair) for pair in pads)
        return conv(x, kernel, strides, pads, precision)

    return impl


# Attention implementation per backend, read at trace time by ``dot_product_attention``.
# "lab" (below) measured 1.1-7x faster forward than jax.nn.dot_product_attention on XLA:CPU
# and made whole train steps 17-38% faster (jaxlib 0.10; docs/BENCHMARKS.md "Speed and
# scale", benchmarks/cpu_levers.py); GPUs and TPUs keep jax.nn's until a measurement there
# says otherwise.
ATTENTION_IMPL_BY_BACKEND: dict[str, str] = {"cpu": "lab", "gpu": "xla", "tpu": "xla"}
# GroupNorm's hand-written backward (``_group_norm_bwd``) per backend: on the CPU it made
# train steps 2-9% faster; elsewhere autodiff of the same formulation runs.
NORM_BACKWARD_BY_BACKEND: dict[str, str] = {"cpu": "lab", "gpu": "autodiff", "tpu": "autodiff"}

# Dropout masks per backend. "lab" computes jax.random.bernoulli's mask bit for bit from an
# unrolled Threefry-2x32 that XLA fuses into the masking (``_threefry2x32``); on XLA:CPU JAX
# lowers Threefry as a rolled while loop that writes its state to memory every round, 4-7x
# slower (benchmarks/cpu_layers.py). GPUs and TPUs already get an unrolled or native lowering.
DROPOUT_IMPL_BY_BACKEND: dict[str, str] = {"cpu": "lab", "gpu": "jax", "tpu": "jax"}

# The hand-written backwards are custom_vjp rules: reverse mode only (jax.grad, jax.vjp).
# Code that needs forward mode through the network (jax.jvp, jax.linearize, jacfwd: JVP
# distillation, consistency training) traces it inside ``forward_mode_ready()``.
_FORWARD_MODE = contextvars.ContextVar("diffax_lab_forward_mode", default=False)


@contextlib.contextmanager
def forward_mode_ready():
    """Within this context, GroupNorm and attention trace without their CPU backward rules
    (custom_vjp), as plain JAX that every transformation accepts, forward mode included.
    It acts when a function is traced: enter it around the first call of a jitted function
    (a jit cache entry traced outside it keeps the reverse-mode rules, and the other way
    round), as ``metrics/ode_likelihood.py`` does around its ``jax.linearize``.
    """
    token = _FORWARD_MODE.set(True)
    try:
        yield
    finally:
        _FORWARD_MODE.reset(token)


def _lab_rules() -> bool:
    return not _FORWARD_MODE.get()


def _mm(a, b):
    """[X, M, K] @ [X, K, N] -> float32: the one dot layout that XLA:CPU hands to its fast
    (YNNPACK) kernels; a dot contracting the lhs's middle axis falls back to a slower one."""
    return jnp.einsum("xmk,xkn->xmn", a, b, preferred_element_type=jnp.float32)


def _swap(a):
    return jnp.swapaxes(a, -1, -2)


_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # jax.nn.dot_product_attention's constant


# Attention over more than _CHUNK_ABOVE logits runs in slices of the folded batch of about
# _CHUNK_ELEMENTS logits each (a lax.map), so that a slice's [T, S] scores stay in cache:
# on the 2-core CPU the cpu config's middle attention at batch 64 ([256, 196, 196] scores,
# 39 MB) went from 15.1 to 5.1 ms this way in a one-off measurement (not a kept benchmark),
# while sizes under 16 MB gained nothing.
_CHUNK_ABOVE = 1 << 22
_CHUNK_ELEMENTS = 1 << 21


def _over_rows(fn, args, per_row: int):
    """fn(*args) on arrays [X, ...] (or None), in slices of X when X * per_row is large."""
    x = args[0].shape[0]
    rows = x
    if x * per_row > _CHUNK_ABOVE:
        rows = max(1, _CHUNK_ELEMENTS // per_row)
        while x % rows:
            rows -= 1
    if rows == x:
        return fn(*args)

    def split(a):
        return None if a is None else a.reshape(x // rows, rows, *a.shape[1:])

    out = jax.lax.map(lambda a: fn(*a), tuple(split(a) for a in args))
    return jax.tree.map(lambda o: o.reshape(x, *o.shape[2:]), out)


def _attention_rows_fwd(q, k, v, keep):
    logits = _mm(q, _swap(k))
    if keep is not None:
        logits = jnp.where(keep, logits, _MASKED)
    p = jax.nn.softmax(logits, axis=-1)
    return _mm(p.astype(v.dtype), v).astype(v.dtype), p


def _attention_fwd(q, k, v, keep):
    o, p = _over_rows(_attention_rows_fwd, (q, k, v, keep), q.shape[1] * k.shape[1])
    return o, (q, k, v, keep, p, o)


def _attention_plain(q, k, v, keep):
    """softmax(q k^T) v on [X, T, D], [X, S, D], [X, S, D]; ``keep`` [X, T, S] bool or None.
    Differentiated by JAX as written (``forward_mode_ready``); ``_attention_core`` is the
    same forward with the hand-written backward."""
    return _attention_fwd(q, k, v, keep)[0]


def _attention_rows_bwd(q, k, v, keep, p, o, g):
    g_t, q_t = jax.lax.optimization_barrier((_swap(g), _swap(q)))
    dv_t = _mm(g_t, p.astype(g.dtype))  # [X, D, S]
    dp = _mm(g, _swap(v))  # [X, T, S]
    delta = jnp.sum(g.astype(jnp.float32) * o.astype(jnp.float32), -1, keepdims=True)
    ds = p * (dp - delta)
    if keep is not None:
        ds = jnp.where(keep, ds, 0.0)
    ds = ds.astype(q.dtype)
    dq = _mm(ds, k)
    dk_t = _mm(q_t, ds)  # [X, D, S]
    dk_t, dv_t = jax.lax.optimization_barrier((dk_t, dv_t))
    return dq.astype(q.dtype), _swap(dk_t).astype(k.dtype), _swap(dv_t).astype(v.dtype)


def _attention_bwd(res, g):
    """The softmax-attention gradient with FlashAttention's row term delta = sum(g o) (no
    reduction over the [T, S] probabilities), every dot written [X, M, K] @ [X, K, N]: the
    two that contract over T take the transposed small operand (held by an optimization
    barrier, else XLA folds the transpose back into the dot) and return the transpose."""
    q, k, v, keep, p, o = res
    per_row = q.shape[1] * k.shape[1]
    dq, dk, dv = _over_rows(_attention_rows_bwd, (q, k, v, keep, p, o, g), per_row)
    return dq, dk, dv, None


_attention_core = jax.custom_vjp(_attention_plain)
_attention_core.defvjp(_attention_fwd, _attention_bwd)


def dot_product_attention(q, k, v, mask=None, impl: str = "auto"):
    """softmax(q k^T / sqrt(D)) v: q [B, T, N, D], k and v [B, S, N, D] -> [B, T, N, D].

    ``mask`` (bool, broadcastable to [B, N, T, S]) leaves keys out, as in
    ``jax.nn.dot_product_attention``, whose result this is (same masking constant, softmax
    in float32; tests/models/test_fast_layers.py compares values and gradients). ``impl``: "xla"
    (jax.nn.dot_product_attention), "lab" (heads folded into the batch, the scale applied
    to q, and a hand-written backward whose dots all take the layout XLA:CPU runs fastest:
    see ``_attention_bwd``), or "auto" (``ATTENTION_IMPL_BY_BACKEND[jax.default_backend()]``
    at trace time). The "lab" backward is a custom_vjp rule (reverse mode); inside
    ``forward_mode_ready()`` the same forward traces without it.
    """
    if impl == "auto":
        impl = ATTENTION_IMPL_BY_BACKEND.get(jax.default_backend(), "xla")
    if impl == "xla":
        return jax.nn.dot_product_attention(q, k, v, mask=mask)
    if impl != "lab":
        raise ValueError(f"attention impl must be 'auto', 'xla' or 'lab', got {impl!r}.")
    b, t, n, d = q.shape
    s = k.shape[1]

    def fold(a, length):  # [B, L, N, D] -> [B N, L, D]; a bitcast when N = 1
        return jnp.transpose(a, (0, 2, 1, 3)).reshape(b * n, length, d)

    q = q * jnp.asarray(1.0 / math.sqrt(d), q.dtype)
    keep = None
    if mask is not None:
        keep = jnp.broadcast_to(mask, (b, n, t, s)).reshape(b * n, t, s)
    core = _attention_core if _lab_rules() else _attention_plain
    out = core(fold(q, t), fold(k, s), fold(v, s), keep)
    return jnp.transpose(out.reshape(b, n, t, d), (0, 2, 1, 3))


def _im2col_conv(x, kernel, strides, pads):
    """NHWC x HWIO convolution as one matmul over the kh*kw shifted (strided) views."""
    kh, kw, cin, cout = kernel.shape
    x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    sh, sw = strides
    h = (x.shape[1] - kh) // sh + 1
    w = (x.shape[2] - kw) // sw + 1
    cols = [
        x[:, i : i + sh * (h - 1) + 1 : sh, j : j + sw * (w - 1) + 1 : sw, :]
        for i in range(kh)
        for j in range(kw)
    ]
    patches = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)
    return patches @ kernel.reshape(kh * kw * cin, cout)


class Conv(nn.Conv):
    """``nn.Conv`` with a backend-selected implementation and nn.Conv's parameter tree.

    ``impl``: "xla" (lax.conv_general_dilated, nn.Conv itself), "im2col" (patches @ kernel,
    2-D, ungrouped, undilated convolutions only; the rest fall back to "xla"), "lab" (1x1
    convolutions with stride 1 and no padding as [N, in] @ [in, out], the rest "xla"), a
    name of ``CONV_IMPLS`` ("lab" with that function in place of XLA's convolution for the
    same 2-D convolutions as "im2col"), or
    "auto" (``CONV_IMPL_BY_BACKEND[jax.default_backend()]`` at trace time). The parameters
    (``kernel`` [kh, kw, in, out], ``bias`` [out]) and their initial values are nn.Conv's,
    so checkpoints and the diffusers weight mapping do not see the difference.
    """

    impl: str = "auto"

    @nn.compact
    def __call__(self, inputs):
        impl = self.impl
        if impl == "auto":
            impl = CONV_IMPL_BY_BACKEND.get(jax.default_backend(), "xla")
        if impl not in _BUILTIN_CONV_IMPLS and impl not in CONV_IMPLS:
            known = ", ".join(repr(n) for n in ("auto", *_BUILTIN_CONV_IMPLS, *CONV_IMPLS))
            raise ValueError(
                f"Conv impl must be one of {known}, got {impl!r} (register another with "
                "layers.register_conv_impl)."
            )
        registered = CONV_IMPLS.get(impl)  # None for the built-in ones
        ks = tuple(self.kernel_size)
        simple = (
            len(ks) == 2
            and inputs.ndim == 4
            and self.feature_group_count == 1
            and self.mask is None
            and self.conv_general_dilated is None  # a user's own convolution: theirs runs
            and self.conv_general_dilated_cls is None
            and all(d in (None, 1) for d in _pair(self.input_dilation))
            and all(d in (None, 1) for d in _pair(self.kernel_dilation))
            and not (isinstance(self.padding, str) and self.padding not in ("SAME", "VALID"))
        )
        strides = _pair(self.strides) if self.strides is not None else (1, 1)
        pointwise = (
            simple
            and ks == (1, 1)
            and strides == (1, 1)
            and (isinstance(self.padding, str) or _zero_padding(self.padding))
        )
        if impl == "xla" or not simple or (impl == "lab" and not pointwise):
            return super().__call__(inputs)
        cin = inputs.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (*ks, cin, self.features), self.param_dtype)
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        if pointwise and impl != "im2col":  # "lab" or registered, 1x1: a dot over the channels
            flat = inputs.reshape(-1, cin)
            y = jnp.dot(flat, kernel.reshape(cin, self.features), precision=self.precision)
            y = y.reshape(*inputs.shape[:-1], self.features)
            return y if bias is None else y + bias
        if isinstance(self.padding, str):
            pads = jax.lax.padtype_to_pads(inputs.shape[1:3], ks, strides, self.padding)
        else:
            pads = nn.linear.canonicalize_padding(self.padding, 2)
        pads = tuple(tuple(int(a) for a in p) for p in pads)
        if registered is not None:
            y = registered(inputs, kernel, strides, pads, self.precision)
        else:
            y = _im2col_conv(inputs, kernel, strides, pads)
        return y if bias is None else y + bias


def _zero_padding(padding) -> bool:
    pads = nn.linear.canonicalize_padding(padding, 2)
    return all(int(a) == 0 for pair in pads for a in pair)


def _pair(v):
    if v is None:
        return (1, 1)
    return (v, v) if isinstance(v, int) else tuple(v)


def _group_layout(x, num_groups: int):
    """(spatial axes, channels per group, elements per group) of x [B, ..., C]."""
    per = x.shape[-1] // num_groups
    return tuple(range(1, x.ndim - 1)), per, math.prod(x.shape[1:-1]) * per


def _group_mean(per_channel_sums, num_groups: int, count: int):
    """[B, C] sums over the image -> [B, G] means over each group's elements."""
    b, c = per_channel_sums.shape
    return per_channel_sums.reshape(b, num_groups, c // num_groups).sum(-1) / count


def _to_image(a, ndim: int):
    """[B, C] -> [B, 1, ..., 1, C], broadcastable against the image."""
    return a.reshape((a.shape[0],) + (1,) * (ndim - 2) + (a.shape[1],))


def _group_norm_plain(x, scale, bias, num_groups, epsilon):
    """Differentiated by JAX as written (GPUs, TPUs, ``forward_mode_ready``); ``_group_norm``
    is the same forward with the hand-written backward."""
    return _group_norm_fwd(x, scale, bias, num_groups, epsilon)[0]


def _group_norm_fwd(x, scale, bias, num_groups, epsilon):
    xf = x.astype(jnp.float32)
    axes, per, count = _group_layout(x, num_groups)
    mean = _group_mean(jnp.sum(xf, axes), num_groups, count)  # [B, G]
    mean_sq = _group_mean(jnp.sum(xf * xf, axes), num_groups, count)
    inv = jax.lax.rsqrt(jnp.maximum(mean_sq - mean * mean, 0.0) + epsilon)  # [B, G]
    a = _to_image(jnp.repeat(inv, per, axis=1), x.ndim) * scale
    shift = bias - _to_image(jnp.repeat(mean, per, axis=1), x.ndim) * a
    return xf * a + shift, (x, scale, mean, inv)


def _group_norm_bwd(num_groups, epsilon, res, dy):
    """dx = inv (gamma dy - mean_g(gamma dy) - xhat mean_g(gamma dy xhat)), written as
    A dy + B x + C with per-(sample, channel) A, B, C from two per-channel sums (of dy and
    dy x): one elementwise pass, no recomputation of xhat over the image."""
    del epsilon
    x, scale, mean, inv = res
    xf = x.astype(jnp.float32)
    axes, per, count = _group_layout(x, num_groups)
    s_dy = jnp.sum(dy, axes)  # [B, C]
    s_dyx = jnp.sum(dy * xf, axes)
    mean_c = jnp.repeat(mean, per, axis=1)  # [B, C]
    inv_c = jnp.repeat(inv, per, axis=1)
    s_dyxhat = inv_c * (s_dyx - mean_c * s_dy)  # sum over the image of dy * xhat, [B, C]
    d_bias = jnp.sum(s_dy, 0)
    d_scale = jnp.sum(s_dyxhat, 0)
    m1 = _group_mean(s_dy * scale, num_groups, count)  # mean_g(gamma dy)
    m2 = _group_mean(s_dyxhat * scale, num_groups, count)  # mean_g(gamma dy xhat)
    m1_c, m2_c = jnp.repeat(m1, per, axis=1), jnp.repeat(m2, per, axis=1)
    coef_dy = inv_c * scale
    coef_x = -inv_c * inv_c * m2_c
    const = -inv_c * m1_c + mean_c * inv_c * inv_c * m2_c
    n = x.ndim
    dx = dy * _to_image(coef_dy, n) + xf * _to_image(coef_x, n) + _to_image(const, n)
    return dx.astype(x.dtype), d_scale, d_bias


_group_norm = jax.custom_vjp(_group_norm_plain, nondiff_argnums=(3, 4))
_group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


def group_norm(x, scale, bias, num_groups: int, epsilon: float):
    """GroupNorm of x [B, ..., C] over all but the batch axis, in float32; returns float32.

    The same maths as ``nn.GroupNorm`` (Flax's fast variance E[x^2] - E[x]^2, clipped at 0),
    arranged for XLA:CPU: per-channel sums over the spatial axes (reductions that keep C
    minor), group statistics from those [B, C] sums, then one fused multiply-add
    x * a[b, c] + s[b, c]. Flax's form reshapes to [B, ..., G, C / G] and reduces over
    non-minor axes, and XLA:CPU fused its autodiff backward into large recomputing kernels;
    this measured 1.1-4.5x faster here (benchmarks/cpu_layers.py). On the CPU
    the backward is hand-written (``_group_norm_bwd``, ``NORM_BACKWARD_BY_BACKEND``; reverse
    mode only, see ``forward_mode_ready``). ``tests/models/test_fast_layers.py`` checks
    values and gradients against nn.GroupNorm.
    """
    c = x.shape[-1]
    if c % num_groups:
        raise ValueError(f"GroupNorm: {num_groups} groups must divide {c} channels.")
    rule = NORM_BACKWARD_BY_BACKEND.get(jax.default_backend(), "autodiff")
    if rule == "lab" and _lab_rules():
        fn = _group_norm
    elif rule in ("lab", "autodiff"):
        fn = _group_norm_plain
    else:
        raise ValueError(f"GroupNorm backward must be 'lab' or 'autodiff', got {rule!r}.")
    return fn(x, scale.astype(jnp.float32), bias.astype(jnp.float32), num_groups, float(epsilon))


class _ScaleBias(nn.Module):
    """The ``scale`` (ones) and ``bias`` (zeros) [C] of nn.GroupNorm, under the same names."""

    features: int

    @nn.compact
    def __call__(self):
        scale = self.param("scale", nn.initializers.ones, (self.features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return scale, bias


class GroupNorm(nn.Module):
    """GroupNorm whose statistics are taken in float32, then cast to the compute dtype.

    Parameters ``norm/scale`` and ``norm/bias``: the tree of the ``nn.GroupNorm(name="norm")``
    this module wrapped before (every checkpoint and the diffusers mapping use it); the
    arithmetic is ``group_norm`` above. ``epsilon`` defaults to Flax's 1e-6 (what every lab
    checkpoint was trained with); torch.nn.GroupNorm's default is 1e-5.
    """

    num_groups: int
    dtype: Any = jnp.float32
    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x):
        scale, bias = _ScaleBias(x.shape[-1], name="norm")()
        return group_norm(x, scale, bias, self.num_groups, self.epsilon).astype(self.dtype)


def make_norm(kind: str, num_groups: int, dtype, epsilon: float, name: str):
    """The block's normalisation: ``GroupNorm`` (kind "group") or the identity ("none",
    no parameters)."""
    if kind == "group":
        return GroupNorm(num_groups, dtype, epsilon, name=name)
    if kind == "none":
        return lambda x: x.astype(dtype)
    raise ValueError(f"model.norm must be one of {NORMS}, got {kind!r}.")


class Downsample(nn.Module):
    """Halves H and W.

    ``padding`` (kind "conv" only) follows diffusers' ``downsample_padding``: 1 pads one
    row and column on each side of the stride-2 3x3 conv; 0 pads only after (bottom and
    right), as TensorFlow's SAME did in DDPM's original code.
    """

    features: int
    kind: str = "conv"
    dtype: Any = jnp.float32
    padding: int = 1

    @nn.compact
    def __call__(self, x):
        if self.kind == "conv":
            if self.padding not in (0, 1):
                raise ValueError(f"model.downsample_padding must be 0 or 1, got {self.padding}.")
            pad = (1, 1) if self.padding == 1 else (0, 1)
            return Conv(
                self.features,
                (3, 3),
                strides=(2, 2),
                padding=(pad, pad),
                dtype=self.dtype,
                name="conv",
            )(x)
        if self.kind == "avgpool":
            x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        elif self.kind == "maxpool":
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        elif self.kind == "rearrange":
            # Rearrange pooling: nothing is thrown away; the conv learns the reduction.
            return Conv(self.features, (3, 3), dtype=self.dtype, name="conv")(space_to_depth(x))
        else:
            raise ValueError(f"model.downsample must be one of {DOWNSAMPLES}, got {self.kind!r}.")
        if x.shape[-1] != self.features:
            x = Conv(self.features, (1, 1), dtype=self.dtype, name="proj")(x)
        return x


class Upsample(nn.Module):
    """Doubles H and W.

    ``transpose`` follows torch.nn.ConvTranspose2d: out = (in - 1) s - 2 p + k + output_padding,
    implemented as lax.conv_transpose with padding (k - 1 - p, k - 1 - p + output_padding).
    The defaults (k = 3, s = 2, p = 1, output_padding = 1) are the course's.
    """

    features: int
    kind: str = "nearest"
    kernel_size: int = 3
    stride: int = 2
    padding: int = 1
    output_padding: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        if self.kind == "transpose":
            k, p, op = self.kernel_size, self.padding, self.output_padding
            lo, hi = k - 1 - p, k - 1 - p + op
            y = nn.ConvTranspose(
                self.features,
                (k, k),
                strides=(self.stride, self.stride),
                padding=((lo, hi), (lo, hi)),
                dtype=self.dtype,
                name="conv",
            )(x)
            expected = (h - 1) * self.stride - 2 * p + k + op
            if y.shape[1] != expected or y.shape[1] != 2 * h:
                raise ValueError(
                    f"model.upsample_transpose (kernel={k}, stride={self.stride}, padding={p}, "
                    f"output_padding={op}) maps {h} -> {y.shape[1]}, not {2 * h}; choose values "
                    f"with (in-1)*stride - 2*padding + kernel + output_padding = 2*in."
                )
            return y
        if self.kind not in ("nearest", "bilinear"):
            raise ValueError(f"model.upsample must be one of {UPSAMPLES}, got {self.kind!r}.")
        if self.kind == "nearest":
            x = nearest_2x(x)
        else:
            x = jax.image.resize(x, (b, 2 * h, 2 * w, c), method=self.kind)
        return Conv(self.features, (3, 3), dtype=self.dtype, name="conv")(x)


_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry2x32(k1, k2, x1, x2):
    """Threefry-2x32 with 20 rounds (Salmon et al. 2011, Random123), unrolled: the hash
    behind JAX's default PRNG (``jax.random.bits`` equals it bit for bit; tested)."""

    def rotl(x, d):
        return (x << jnp.uint32(d)) | (x >> jnp.uint32(32 - d))

    ks = (k1, k2, k1 ^ k2 ^ jnp.uint32(0x1BD11BDA))
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for i in range(5):
        for r in _THREEFRY_ROTATIONS[i % 2]:
            x1 = x1 + x2
            x2 = rotl(x2, r) ^ x1
        x1 = x1 + ks[(i + 1) % 3]
        x2 = x2 + ks[(i + 2) % 3] + jnp.uint32(i + 1)
    return x1, x2


def _threefry_key_data(rng):
    """The two uint32 words of a Threefry key (typed or raw), or None for another PRNG."""
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        if str(jax.random.key_impl(rng)) != "threefry2x32":
            return None
        return jax.random.key_data(rng)
    if str(jax.config.jax_default_prng_impl) != "threefry2x32" or rng.shape != (2,):
        return None
    return rng


def bernoulli(rng, p: float, shape, impl: str = "auto"):
    """``jax.random.bernoulli(rng, p, shape)`` (a bool mask), the same bits on every impl.

    impl: "jax" (jax.random's), "lab" (an unrolled Threefry that XLA fuses with the code
    around it; ``DROPOUT_IMPL_BY_BACKEND``), or "auto" (by backend, at trace time). "lab"
    falls back to jax.random where its bits would differ: another PRNG implementation, p not
    float32, ``jax_threefry_partitionable`` off, 64-bit floats, or 2^32 or more values.
    """
    if impl == "auto":
        impl = DROPOUT_IMPL_BY_BACKEND.get(jax.default_backend(), "jax")
    if impl not in ("jax", "lab"):
        raise ValueError(f"bernoulli impl must be 'auto', 'jax' or 'lab', got {impl!r}.")
    shape = tuple(shape)
    key = _threefry_key_data(rng) if impl == "lab" else None
    if (
        key is None
        or jnp.result_type(p) != jnp.float32  # jax.random draws in p's dtype
        or not jax.config.jax_threefry_partitionable
        or jax.config.jax_enable_x64
        or math.prod(shape) >= 2**32
    ):
        return jax.random.bernoulli(rng, p, shape)
    # jax.random.bits: the hash of the 64-bit counter (hi, lo) of each element, words xor-ed;
    # jax.random.uniform: 23 high bits as a float32 mantissa in [1, 2), minus 1.
    count = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    b1, b2 = _threefry2x32(key[0], key[1], jnp.zeros_like(count), count)
    bits = ((b1 ^ b2) >> jnp.uint32(9)) | jnp.uint32(0x3F800000)
    return jax.lax.bitcast_convert_type(bits, jnp.float32) - 1.0 < p


class Dropout(nn.Dropout):
    """``flax.linen.Dropout`` with its mask from ``bernoulli`` (the same mask, bit for bit,
    faster on the CPU). The class keeps Flax's name, so auto-named instances (``Dropout_0``)
    draw the same keys from ``make_rng`` as nn.Dropout did: runs and checkpoints carry over."""

    impl: str = "auto"

    @nn.compact
    def __call__(self, inputs, deterministic: bool | None = None, rng=None):
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if self.rate == 0.0 or deterministic:
            return inputs
        if self.rate == 1.0:  # no 0/0 in the gradient
            return jnp.zeros_like(inputs)
        keep = 1.0 - self.rate
        if rng is None:
            rng = self.make_rng(self.rng_collection)
        shared = {d % inputs.ndim for d in self.broadcast_dims}
        shape = [1 if d in shared else n for d, n in enumerate(inputs.shape)]
        mask = jnp.broadcast_to(bernoulli(rng, keep, shape, self.impl), inputs.shape)
        return jax.lax.select(mask, inputs / keep, jnp.zeros_like(inputs))


class ResBlock(nn.Module):
    """DDPM's residual block; ``emb`` ([B, E] or None) is projected and added after conv 1.

    ``norm="none"`` replaces both GroupNorms by the identity. ``residual=False`` returns the
    second conv's output alone (no skip path, no 1x1 ``skip`` projection); its conv2 then
    keeps Flax's default initialisation, since a zero-initialised conv2 without the skip
    would output zeros and pass no gradient to anything before it.
    """

    features: int
    num_groups: int = 32
    dropout: float = 0.0
    activation: str = "silu"
    dtype: Any = jnp.float32
    norm_eps: float = 1e-6
    norm: str = "group"  # group | none
    residual: bool = True

    @nn.compact
    def __call__(self, x, emb, *, train: bool):
        act = ACTIVATIONS[self.activation]
        if not isinstance(self.residual, bool):
            raise ValueError(f"model.residual must be True or False, got {self.residual!r}.")
        h = act(make_norm(self.norm, self.num_groups, self.dtype, self.norm_eps, "norm1")(x))
        h = Conv(self.features, (3, 3), dtype=self.dtype, name="conv1")(h)
        if emb is not None:
            h = (
                h
                + nn.Dense(self.features, dtype=self.dtype, name="emb_proj")(act(emb))[
                    :, None, None
                ]
            )
        h = act(make_norm(self.norm, self.num_groups, self.dtype, self.norm_eps, "norm2")(h))
        h = Dropout(self.dropout, deterministic=not train)(h)
        if not self.residual:
            return Conv(self.features, (3, 3), dtype=self.dtype, name="conv2")(h)
        # Zero-initialised last conv: each block starts as the identity (improved-diffusion).
        h = Conv(
            self.features, (3, 3), dtype=self.dtype, kernel_init=nn.initializers.zeros, name="conv2"
        )(h)
        if x.shape[-1] != self.features:
            x = Conv(self.features, (1, 1), dtype=self.dtype, name="skip")(x)
        return x + h


class AttentionBlock(nn.Module):
    """Self-attention over the H*W positions with a residual connection.

    ``num_heads`` heads, or, when ``head_dim`` > 0, C / head_dim heads of that size (the
    count then grows with the level's width, as in diffusers' ``attention_head_dim``). The
    fused ``qkv`` projection's outputs are [q | k | v], each head-major.
    """

    num_heads: int = 1
    num_groups: int = 32
    dtype: Any = jnp.float32
    head_dim: int = 0
    norm_eps: float = 1e-6
    norm: str = "group"  # group | none (no normalisation before the projections)

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        if self.head_dim:
            if c % self.head_dim:
                raise ValueError(
                    f"model.attention_head_dim={self.head_dim} must divide every attention "
                    f"block's channels; {c} is not a multiple."
                )
            num_heads = c // self.head_dim
        else:
            if c % self.num_heads:
                raise ValueError(
                    f"model.attention_heads={self.num_heads} must divide {c} channels."
                )
            num_heads = self.num_heads
        head_dim = c // num_heads
        y = make_norm(self.norm, self.num_groups, self.dtype, self.norm_eps, "norm")(x)
        y = y.reshape(b, h * w, c)
        qkv = nn.Dense(3 * c, dtype=self.dtype, name="qkv")(y)
        q, k, v = jnp.split(qkv.reshape(b, h * w, 3 * num_heads, head_dim), 3, axis=2)
        y = dot_product_attention(q, k, v).reshape(b, h * w, c)
        y = nn.Dense(c, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="out")(y)
        return x + y.reshape(b, h, w, c)
