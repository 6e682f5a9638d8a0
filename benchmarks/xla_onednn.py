"""XLA:CPU's own oneDNN convolution, called from JAX: a diagnostic for the CPU gap.

    python -m benchmarks.xla_onednn --config=configs/ddpm.py:cpu [--iters=20] [--rounds=3]

jaxlib's XLA:CPU is built with oneDNN and has a thunk that runs a oneDNN convolution on
XLA's own intra-op thread pool (``OneDnnOpThunk``, custom call target
``__onednn$convolution``). The HLO pass that would put convolutions there does not run
in this jaxlib (``--xla_cpu_use_onednn`` leaves every convolution XLA's own), but the
thunk answers any custom call with that target and a ``OneDnnConvolutionConfig`` backend
config. This module emits such calls itself (``jax.ffi.ffi_call`` with the legacy
custom-call API and the config as JSON): unlike ``benchmarks/onednn_ffi.py``, which runs
PyTorch's oneDNN on PyTorch's OpenMP threads beside XLA's, these kernels share XLA's
threads.

The thunk runs oneDNN's *forward* convolution only. The pieces of a convolution's
training step, each a forward convolution of some operands:

- forward: the convolution itself;
- input gradient (stride 1): the output gradient convolved with the spatially flipped
  kernel, its input and output features swapped, padded ``k - 1 - pad``;
- kernel gradient: the input, its batch and feature axes swapped (features as oneDNN's
  batch, images as its channels), convolved with the output gradient as the kernel
  (dilated by the stride); the result's batch axis is the kernel's input features.

``register_conv_impls()`` adds to ``layers.CONV_IMPLS``:

- ``xla_onednn``: forward and input gradient oneDNN's, the kernel gradient XLA's;
- ``xla_onednn_all``: the kernel gradient oneDNN's too.

Convolutions the pieces do not cover keep XLA's: not float32, or negative padding (all
pieces); an input gradient with stride > 1 or padding beyond ``k - 1``; a kernel gradient
with fewer than ``MIN_KERNEL_GRAD_FEATURES`` output features, where oneDNN's was slower.
``benchmarks/cpu_levers.py`` prices them in the whole step (variants
``conv_xla_onednn`` and ``conv_xla_onednn_all``); this module's CLI times each piece of
each distinct convolution of a config's network alone. docs/BENCHMARKS.md has the figures
(the seventh pass). They are not the lab's defaults, for two reasons found there:

- **XLA cannot serialize these programs.** jaxlib 0.10.2's thunk serializer takes the
  oneDNN thunk (its kind is "custom call") for a ``CustomCallThunk`` and fails with
  ``std::bad_alloc`` after reading memory that is not one. A persistent compilation
  cache write does exactly that: the write fails, and the process's later steps ran with
  tens of thousands of page faults each. So a program calling these kernels must be
  compiled with JAX's persistent cache off; ``conv_impl`` refuses to trace otherwise
  (``persistent_cache_off()`` turns it off). The lab's CPU programs are cached, which
  item 2 of the speed issue asks for.
- They gain little: the forward and input gradient are faster, but the kernel gradient,
  the piece furthest behind PyTorch's, is slower this way than XLA's own (oneDNN's
  backward-weights kernel, PyTorch's, is not reachable through the thunk).

The config's conventions (0-based dimension numbers, strides and padding as they are,
window dilations as XLA's) are this jaxlib's XLA; older XLAs stored them offset by one,
and a config read with the wrong convention aborts the process in oneDNN. ``supported()``
therefore probes once, in a subprocess, that a convolution built here matches
``lax.conv_general_dilated`` before the first call is traced.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

TARGET = "__onednn$convolution"
# Kernel gradients with fewer output features keep XLA's (the network's last convolution,
# 32 -> 1 channel, took 2.2 ms against XLA's 0.9 ms alone; the seventh pass).
MIN_KERNEL_GRAD_FEATURES = 8
IMPLS = {"xla_onednn": "fx", "xla_onednn_all": "fxw"}
_NHWC = (0, 3, (1, 2))  # batch, feature, spatial dimensions of an NHWC array
_HWIO = (2, 3, (0, 1))  # input feature, output feature, spatial dimensions of HWIO
_probe: dict = {}


def config(inp, ker, out, strides, pad_lo, pad_hi, rhs_dilation) -> str:
    """The ``OneDnnConvolutionConfig`` backend config (JSON of xla.cpu.BackendConfig) of a
    2-D convolution: ``inp`` and ``out`` as (batch, feature, spatial) dimension numbers,
    ``ker`` as (input feature, output feature, spatial)."""

    def data(d):
        return {"batch_dim": d[0], "feature_dim": d[1], "spatial_dims": list(d[2])}

    cfg = {
        "dims": 4,
        "input": {"data": data(inp)},
        "kernel": {
            "filter": {
                "input_feature_dim": ker[0],
                "output_feature_dim": ker[1],
                "spatial_dims": list(ker[2]),
            }
        },
        "output": {"data": data(out)},
        "window": {
            "pad_left": [int(p) for p in pad_lo],
            "pad_right": [int(p) for p in pad_hi],
            "strides": [int(s) for s in strides],
            "window_dilations": [int(d) for d in rhs_dilation],
        },
        "feature_groups": 1,
    }
    return json.dumps({"onednn_conv_config": cfg})


def _call(x, k, out_shape, **kw):
    out = jax.ShapeDtypeStruct(tuple(int(d) for d in out_shape), jnp.float32)
    call = jax.ffi.ffi_call(
        TARGET,
        out,
        vmap_method="sequential",
        custom_call_api_version=1,
        legacy_backend_config=config(**kw),
    )
    return call(x, k)


def forward(x, kernel, strides, pads):
    """The NHWC x HWIO convolution with explicit ``pads`` ((lo, hi) per spatial axis)."""
    b, h, w, _ = x.shape
    kh, kw, _, cout = kernel.shape
    (l0, h0), (l1, h1) = pads
    shape = (b, (h + l0 + h0 - kh) // strides[0] + 1, (w + l1 + h1 - kw) // strides[1] + 1, cout)
    return _call(
        x, kernel, shape, inp=_NHWC, ker=_HWIO, out=_NHWC, strides=strides,
        pad_lo=(l0, l1), pad_hi=(h0, h1), rhs_dilation=(1, 1),
    )  # fmt: skip


def input_grad_pads(x_shape, dy_shape, kernel_shape, pads):
    """The (lo, hi) pads of the input gradient as a forward convolution of a stride-1
    convolution, or None where one is negative (then XLA's runs)."""
    lo, hi = [], []
    for i in range(2):
        k = kernel_shape[i]
        lo.append(k - 1 - pads[i][0])
        hi.append(x_shape[1 + i] - dy_shape[1 + i] - lo[i] + k - 1)
    return None if min(lo + hi) < 0 else (tuple(lo), tuple(hi))


def input_grad(dy, kernel, x_shape, pads):
    """dx of the stride-1 convolution: dy convolved with the flipped kernel, its input and
    output features swapped (read so by the config, not transposed)."""
    lo, hi = input_grad_pads(x_shape, dy.shape, kernel.shape, pads)
    return _call(
        dy, kernel[::-1, ::-1], x_shape, inp=_NHWC, ker=(3, 2, (0, 1)), out=_NHWC,
        strides=(1, 1), pad_lo=lo, pad_hi=hi, rhs_dilation=(1, 1),
    )  # fmt: skip


def kernel_grad_pads(x_shape, dy_shape, kernel_shape, strides, pads):
    """(lo, hi) pads of the kernel gradient as a forward convolution, or None."""
    lo, hi = [], []
    for i in range(2):
        lo.append(pads[i][0])
        # the output's spatial size must be the kernel's: in + lo + hi - span + 1 = k
        span = (dy_shape[1 + i] - 1) * strides[i] + 1
        hi.append(kernel_shape[i] - 1 + span - x_shape[1 + i] - lo[i])
    return None if min(lo + hi) < 0 else (tuple(lo), tuple(hi))


def kernel_grad(x, dy, kernel_shape, strides, pads):
    """dW (HWIO) of the convolution: x as [in features, H, W, images] (oneDNN's batch and
    channels), dy as the kernel [images, H', W', out features] dilated by the stride; the
    result [in features, kh, kw, out features] transposed to HWIO."""
    kh, kw, cin, cout = kernel_shape
    lo, hi = kernel_grad_pads(x.shape, dy.shape, kernel_shape, strides, pads)
    out = _call(
        x.transpose(3, 1, 2, 0), dy, (cin, kh, kw, cout), inp=_NHWC, ker=_NHWC, out=_NHWC,
        strides=(1, 1), pad_lo=lo, pad_hi=hi, rhs_dilation=strides,
    )  # fmt: skip
    return out.transpose(1, 2, 0, 3)


def persistent_cache_on() -> bool:
    return bool(jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir)


def persistent_cache_off() -> None:
    """Turns JAX's persistent compilation cache off for this process (see the module
    docstring: XLA cannot serialize programs with these calls)."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    jax.config.update("jax_enable_compilation_cache", False)
    cc.reset_cache()  # JAX decides once per process whether the cache is used, until reset


_PROBE = r"""
import sys
sys.path.insert(0, {root!r})
import jax
jax.config.update("jax_enable_compilation_cache", False)
import numpy as np
from benchmarks import xla_onednn as m
from diffax_lab.models.layers import xla_conv
x = np.random.default_rng(0).normal(size=(2, 6, 5, 3)).astype(np.float32)
k = np.random.default_rng(1).normal(size=(3, 3, 3, 4)).astype(np.float32)
pads = ((1, 1), (1, 1))
y = jax.jit(lambda x, k: m.forward(x, k, (1, 1), pads))(x, k)
ref = xla_conv(x, k, (1, 1), pads)
print("MATCH" if np.allclose(y, ref, rtol=1e-4, atol=1e-4) else "MISMATCH")
"""


def supported() -> tuple[bool, str]:
    """(whether this jaxlib runs the convolution this module builds, and what the probe
    printed): run once per process, in a subprocess, since a misread config aborts."""
    if "result" not in _probe:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        try:
            r = subprocess.run(
                [sys.executable, "-c", _PROBE.format(root=root)],
                capture_output=True, text=True, timeout=300, env=env,
            )  # fmt: skip
            said = (r.stdout + r.stderr).strip()
            _probe["result"] = (r.returncode == 0 and "MATCH" in r.stdout.split(), said[-2000:])
        except (OSError, subprocess.TimeoutExpired) as e:
            _probe["result"] = (False, f"{type(e).__name__}: {e}")
    return _probe["result"]


def _check_usable() -> None:
    if jax.default_backend() != "cpu":
        raise RuntimeError("benchmarks/xla_onednn.py: XLA:CPU's oneDNN thunk runs on CPU only.")
    if persistent_cache_on():
        raise RuntimeError(
            "benchmarks/xla_onednn.py: JAX's persistent compilation cache is on, and XLA "
            "cannot serialize programs that call its oneDNN convolution (jaxlib 0.10.2: "
            "std::bad_alloc). Call xla_onednn.persistent_cache_off() (or "
            "jax.config.update('jax_enable_compilation_cache', False)) before tracing."
        )
    ok, said = supported()
    if not ok:
        raise RuntimeError(
            "benchmarks/xla_onednn.py: this jaxlib does not run the oneDNN convolution as "
            f"built here (a probe in a subprocess printed: {said!r}). Use another conv impl."
        )


def conv_impl(pieces: str):
    """A ``layers.CONV_IMPLS`` function: the pieces in ``pieces`` ("f" forward, "x" input
    gradient, "w" kernel gradient) by XLA's oneDNN thunk where they apply, XLA's own
    convolution for the rest."""
    from diffax_lab.models import layers

    def dx(g, kernel, x_shape, strides, pads):
        if strides == (1, 1) and input_grad_pads(x_shape, g.shape, kernel.shape, pads):
            return input_grad(g, kernel, x_shape, pads)
        return None

    def dw(x, g, kernel_shape, strides, pads):
        enough = kernel_shape[3] >= MIN_KERNEL_GRAD_FEATURES
        if enough and kernel_grad_pads(x.shape, g.shape, kernel_shape, strides, pads):
            return kernel_grad(x, g, kernel_shape, strides, pads)
        return None

    conv = layers.conv_from_pieces(
        forward if "f" in pieces else None,
        dx if "x" in pieces else None,
        dw if "w" in pieces else None,
    )

    def impl(x, kernel, strides, pads, precision):
        negative = any(int(p) < 0 for pair in pads for p in pair)  # cropping: not oneDNN's
        if x.dtype != jnp.float32 or kernel.dtype != jnp.float32 or negative:
            return layers.xla_conv(x, kernel, strides, pads, precision)
        _check_usable()
        return conv(x, kernel, strides, pads, precision)

    return impl


def register_conv_impls() -> list[str]:
    """Adds ``IMPLS`` to ``layers.CONV_IMPLS``; returns their names."""
    from diffax_lab.models import layers

    for name, pieces in IMPLS.items():
        if name not in layers.CONV_IMPLS:
            layers.register_conv_impl(name, conv_impl(pieces))
    return list(IMPLS)


# The CLI: each piece of each distinct convolution of a config's network, alone.

FLAGS = flags.FLAGS


def define_flags():
    from benchmarks.common_flags import define_measurement_flags, define_runtime_flag

    define_measurement_flags()
    define_runtime_flag()
    flags.DEFINE_integer("rounds", 3, "Alternating rounds of XLA's and oneDNN's pieces.")
    flags.DEFINE_string("out", "", "Also write the JSON here.")


def piece_programs(spec) -> dict:
    """{piece: (xla's compiled fn, onednn's compiled fn or None, args)} for one convolution
    spec of ``conv_cap.network_convs`` (NHWC, HWIO, 2-D), each compiled as the lab
    compiles its train step."""
    from diffax_lab import compilation
    from diffax_lab.models.layers import xla_conv

    rng = np.random.default_rng(0)
    strides, pads = tuple(spec["window_strides"]), tuple(map(tuple, spec["padding"]))
    x = jnp.asarray(rng.normal(size=spec["lhs"]), jnp.float32)
    k = jnp.asarray(rng.normal(size=spec["rhs"]) * 0.1, jnp.float32)
    y_shape = jax.eval_shape(lambda x, k: xla_conv(x, k, strides, pads), x, k).shape
    g = jnp.asarray(rng.normal(size=y_shape), jnp.float32)

    def ours(fn, *args):  # as the lab compiles a train step (its CPU fusion options)
        return compilation.compile_with_options(jax.jit(fn).lower(*args), training=True)

    progs = {
        "forward": (
            ours(lambda x, k: xla_conv(x, k, strides, pads), x, k),
            ours(lambda x, k: forward(x, k, strides, pads), x, k),
            (x, k),
        ),
        "input_grad": (
            ours(lambda g, k: jax.vjp(lambda x: xla_conv(x, k, strides, pads), x)[1](g)[0], g, k),
            ours(lambda g, k: input_grad(g, k, x.shape, pads), g, k)
            if strides == (1, 1) and input_grad_pads(x.shape, g.shape, k.shape, pads)
            else None,
            (g, k),
        ),
        "kernel_grad": (
            ours(lambda x, g: jax.vjp(lambda k: xla_conv(x, k, strides, pads), k)[1](g)[0], x, g),
            ours(lambda x, g: kernel_grad(x, g, k.shape, strides, pads), x, g)
            if kernel_grad_pads(x.shape, g.shape, k.shape, strides, pads)
            else None,
            (x, g),
        ),
    }
    return progs


def main(argv):
    del argv
    from benchmarks import conv_cap
    from benchmarks.common_flags import configure_runtime, print_json
    from benchmarks.cpu_profile import timed

    runtime = configure_runtime()
    persistent_cache_off()
    _check_usable()
    config = FLAGS.config
    specs = conv_cap.config_convs(config, {"train": config.train.batch_size})["train"]
    counts: dict = {}
    for s in specs:
        if s["rhs"][:2] == (1, 1) or s["feature_group_count"] != 1:
            continue  # 1x1: the lab runs these as dots
        key = (s["lhs"], s["rhs"], tuple(s["window_strides"]), tuple(map(tuple, s["padding"])))
        counts.setdefault(key, [s, 0])[1] += 1
    rows = []
    for (lhs, rhs, strides, pads), (spec, n) in counts.items():
        progs = piece_programs(spec)
        row = {"lhs": lhs, "rhs": rhs, "strides": strides, "padding": pads, "count": n}
        for piece, (xla, onednn, args) in progs.items():
            xs, os_ = [], []
            for _ in range(FLAGS.rounds):
                xs.append(timed(lambda f=xla, a=args: f(*a), FLAGS.iters) * 1e3)
                if onednn is not None:
                    os_.append(timed(lambda f=onednn, a=args: f(*a), FLAGS.iters) * 1e3)
            row[f"{piece}_xla_ms"] = float(np.median(xs))
            row[f"{piece}_onednn_ms"] = float(np.median(os_)) if os_ else None
            few = piece == "kernel_grad" and rhs[3] < MIN_KERNEL_GRAD_FEATURES
            row[f"{piece}_used"] = "xla" if onednn is None or few else "onednn"
            if onednn is not None:  # agreement, relative to the largest magnitude
                a, b = np.asarray(onednn(*args)), np.asarray(xla(*args))
                row[f"{piece}_max_rel_err"] = float(np.abs(a - b).max() / np.abs(b).max())
        rows.append(row)
        print(json.dumps(row), flush=True)
    totals = {}
    for piece in ("forward", "input_grad", "kernel_grad"):
        # Weighted by occurrence. "onednn": the piece as ``xla_onednn_all`` runs it (XLA's
        # where oneDNN's does not apply or has too few output features).
        totals[f"{piece}_xla_ms"] = sum(r["count"] * r[f"{piece}_xla_ms"] for r in rows)
        totals[f"{piece}_onednn_ms"] = sum(
            r["count"] * r[f"{piece}_{'onednn' if r[f'{piece}_used'] == 'onednn' else 'xla'}_ms"]
            for r in rows
        )
    print_json(
        {
            "train_batch": config.train.batch_size,
            "jax": jax.__version__,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "cpu_runtime": runtime,
            "totals_per_step": totals,
            "convolutions": rows,
        },
        FLAGS.out,
    )


if __name__ == "__main__":
    define_flags()
    app.run(main)
