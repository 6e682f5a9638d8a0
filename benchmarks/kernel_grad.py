"""Can a 3x3 convolution's kernel gradient be computed faster than XLA:CPU computes it?

    python -m benchmarks.kernel_grad --config=configs/ddpm.py:cpu [--iters=20] [--rounds=5] \
        [--threads=2] [--formulations=xla,im2col,...] [--out=FILE]

The kernel gradient is where XLA:CPU's convolutions fall furthest behind PyTorch's oneDNN
(``benchmarks/conv_cap.py --pieces``). For each distinct 3x3, stride-1, "same"-padded
convolution of the config's train batch (read from the jaxpr as ``conv_cap`` reads them),
the kernel gradient ``dW[i, j] = sum over b, h, w of x_pad[b, h+i, w+j, :]^T dy[b, h, w, :]``
is computed by every formulation of ``FORMULATIONS``, each compiled with the lab's options
(``compilation.compile_with_options``):

- ``xla``: ``jax.vjp`` of ``lax.conv_general_dilated``, what the lab runs. XLA:CPU
  transposes x and dy and convolves them with an image-sized window;
- ``im2col``: the nine shifted copies of x side by side (``[B H W, 9 C_in]``), one dot
  contracting B H W;
- ``im2col_dyt``: the same patches, but dy transposed once (``[C_out, B H W]``) and put on
  the left, so that the dot has the layout YNNPACK takes (the left operand contracted along
  its rows, the right along its columns) instead of contracting the patches' leading axis;
- ``nine_dots``: one dot per kernel tap, the shifted x (``[B H W, C_in]``) against dy;
- ``patches_t``: x transposed once to ``[C_in, B, H+2, W+2]``, its nine shifts stacked
  (``[9 C_in, B H W]``), one dot in the dot's preferred layout (rows of the left operand
  contiguous along the contraction);
- ``shift_gemm``: the padded images flattened to rows, so that a tap's shift is a
  contiguous slice; dy is placed on the same padded grid (zeros elsewhere); nine dots;
- ``batch_split``: XLA's kernel gradient on each half of the batch, summed;
- ``onednn_ffi``, ``onednn_ffi_1t``: oneDNN's kernel gradient (PyTorch's) as a custom call
  inside the compiled program (``benchmarks/onednn_ffi.py``), on ``--threads`` threads or
  on one (the setting that the whole-step variant ``cpu_levers --variants=conv_onednn_dw``
  uses);
- ``gemm_floor``: only the dot of ``patches_t``, its ``[9 C_in, B H W]`` operand built
  beforehand. Not a kernel gradient: the time below which no formulation that ends in
  such a dot can go, since each must build its operand first.

Beside them, PyTorch's ``torch.nn.grad.conv2d_weight`` on the same numbers (channels-last,
``--threads`` threads). Rounds alternate the formulations; medians in ms, and totals
weighted by how often each convolution occurs in the network. Every formulation's result
is checked against ``xla``'s before it is timed (and in tests/test_benchmarks.py). Run with
``XLA_FLAGS`` to try XLA's own options on the ``xla`` row (the JSON records them).
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks.common_flags import (
    check_choices,
    configure_runtime,
    define_measurement_flags,
    define_runtime_flag,
    print_json,
)
from benchmarks.conv_cap import config_convs
from diffax_lab import compilation

FLAGS = flags.FLAGS
NHWC = ("NHWC", "HWIO", "NHWC")


def _pad(x):
    return jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))


def _taps(xp, h, w):
    """The nine shifted [B, H, W, C] views of the padded x, row-major over (i, j)."""
    return [xp[:, i : i + h, j : j + w, :] for i in range(3) for j in range(3)]


def dw_xla(x, dy):
    k = jnp.zeros((3, 3, x.shape[-1], dy.shape[-1]), x.dtype)

    def conv(k):
        return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=NHWC)

    return jax.vjp(conv, k)[1](dy)[0]


def dw_im2col(x, dy):
    b, h, w, c = x.shape
    patches = jnp.concatenate(_taps(_pad(x), h, w), axis=-1).reshape(-1, 9 * c)
    dw = jax.lax.dot_general(patches, dy.reshape(-1, dy.shape[-1]), (((0,), (0,)), ((), ())))
    return dw.reshape(3, 3, c, -1)


def dw_im2col_dyt(x, dy):
    b, h, w, c = x.shape
    patches = jnp.concatenate(_taps(_pad(x), h, w), axis=-1).reshape(-1, 9 * c)
    dyt = dy.reshape(-1, dy.shape[-1]).T  # [C_out, B H W]
    return (dyt @ patches).reshape(-1, 3, 3, c).transpose(1, 2, 3, 0)


def dw_nine_dots(x, dy):
    b, h, w, c = x.shape
    d = dy.reshape(-1, dy.shape[-1])
    taps = [
        jax.lax.dot_general(t.reshape(-1, c), d, (((0,), (0,)), ((), ())))
        for t in _taps(_pad(x), h, w)
    ]
    return jnp.stack(taps).reshape(3, 3, c, -1)


def patches_t(x):
    """[9 C_in, B H W]: row (i, j, c) holds channel c of x shifted by tap (i, j)."""
    b, h, w, c = x.shape
    xt = _pad(x).transpose(3, 0, 1, 2)  # [C, B, H+2, W+2]
    taps = [xt[:, :, i : i + h, j : j + w] for i in range(3) for j in range(3)]
    return jnp.stack(taps).reshape(9 * c, -1)


def dw_patches_t(x, dy):
    return (patches_t(x) @ dy.reshape(-1, dy.shape[-1])).reshape(3, 3, x.shape[-1], -1)


def dw_shift_gemm(x, dy):
    b, h, w, c = x.shape
    wp = w + 2
    rows = _pad(x).reshape(-1, c)  # [B (H+2) (W+2), C]
    rows = jnp.pad(rows, ((0, 2 * wp + 2), (0, 0)))  # room for the last tap's shift
    # dy at the top-left of each padded grid: output (h, w) reads rows (h+i, w+j).
    d = jnp.pad(dy, ((0, 0), (0, 2), (0, 2), (0, 0))).reshape(-1, dy.shape[-1])
    n = d.shape[0]
    dt = d.T  # [C_out, rows]
    taps = [
        dt @ jax.lax.slice_in_dim(rows, i * wp + j, i * wp + j + n)
        for i in range(3)
        for j in range(3)
    ]
    return jnp.stack(taps).reshape(3, 3, -1, c).transpose(0, 1, 3, 2)


def dw_batch_split(x, dy):
    xs, ds = jnp.split(x, 2), jnp.split(dy, 2)
    return dw_xla(xs[0], ds[0]) + dw_xla(xs[1], ds[1])


def dw_onednn_ffi(x, dy, threads=0):
    from benchmarks import onednn_ffi

    kernel = (3, 3, x.shape[-1], dy.shape[-1])
    return onednn_ffi.conv_kernel_grad(x, dy, kernel, (1, 1), (1, 1), threads)


FORMULATIONS = {
    "xla": dw_xla,
    "im2col": dw_im2col,
    "im2col_dyt": dw_im2col_dyt,
    "nine_dots": dw_nine_dots,
    "patches_t": dw_patches_t,
    "shift_gemm": dw_shift_gemm,
    "batch_split": dw_batch_split,
    "onednn_ffi": dw_onednn_ffi,
    "onednn_ffi_1t": functools.partial(dw_onednn_ffi, threads=1),
}
NAMES = (*FORMULATIONS, "gemm_floor")  # what --formulations may name


def eligible(spec) -> bool:
    """A 3x3, stride-1, 'same'-padded, undilated, ungrouped NHWC/HWIO convolution."""
    lhs, rhs = spec["lhs"], spec["rhs"]
    return (
        len(lhs) == 4
        and tuple(rhs[:2]) == (3, 3)
        and spec["dimension_numbers"] == jax.lax.conv_dimension_numbers(lhs, rhs, NHWC)
        and tuple(spec["window_strides"]) == (1, 1)
        and tuple(map(tuple, spec["padding"])) == ((1, 1), (1, 1))
        and tuple(spec["lhs_dilation"]) == (1, 1)
        and tuple(spec["rhs_dilation"]) == (1, 1)
        and spec["feature_group_count"] == 1
    )


def programs(spec, names, torch=None) -> dict:
    """{name: no-argument callable} for one convolution; each formulation checked against
    ``xla``'s result first (ValueError naming the formulation if it differs)."""
    rng = np.random.default_rng(0)
    b, h, w, c = spec["lhs"]
    x = jnp.asarray(rng.normal(size=(b, h, w, c)), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(b, h, w, spec["rhs"][-1])), jnp.float32)
    ref = None
    out = {}
    for name in ["xla", *[n for n in names if n != "xla"]]:
        if name == "batch_split" and b % 2:
            continue  # halves of an odd batch
        if name == "gemm_floor":
            p = patches_t(x)
            d = dy.reshape(-1, dy.shape[-1])
            c_ = compilation.compile_with_options(jax.jit(jnp.matmul).lower(p, d), training=True)
            out[name] = lambda c_=c_, p=p, d=d: c_(p, d)
            continue
        c_ = compilation.compile_with_options(
            jax.jit(FORMULATIONS[name]).lower(x, dy), training=True
        )
        result = np.asarray(c_(x, dy))
        if ref is None:
            ref = result
        scale = float(np.max(np.abs(ref)))
        if not np.allclose(result, ref, rtol=0, atol=1e-4 * scale):
            err = float(np.max(np.abs(result - ref))) / scale
            raise ValueError(f"{name} differs from XLA's kernel gradient by {err:.2e} (relative)")
        if name in names:
            out[name] = lambda c_=c_: c_(x, dy)
    if torch is not None:
        cl = torch.channels_last
        tx = torch.from_numpy(np.asarray(_pad(x)).transpose(0, 3, 1, 2).copy())
        tx = tx.contiguous(memory_format=cl)
        tg = torch.from_numpy(np.asarray(dy).transpose(0, 3, 1, 2).copy())
        tg = tg.contiguous(memory_format=cl)
        shape = (dy.shape[-1], c, 3, 3)
        out["torch"] = lambda: torch.nn.grad.conv2d_weight(tx, shape, tg)
    return out


def define_flags():
    define_measurement_flags()
    define_runtime_flag()
    flags.DEFINE_integer("rounds", 5, "Alternating rounds over the formulations.")
    flags.DEFINE_integer("threads", 2, "torch.set_num_threads (0 = torch's default).")
    flags.DEFINE_list(
        "formulations",
        list(NAMES),
        f"Of {list(NAMES)}; 'xla' is always built (the reference).",
    )
    flags.DEFINE_bool("torch", True, "Also time PyTorch's conv2d_weight.")
    flags.DEFINE_string("out", "", "Also write the JSON here.")


def main(argv):
    del argv
    runtime = configure_runtime()
    from benchmarks.cpu_profile import timed

    check_choices("formulations", FLAGS.formulations, NAMES)
    torch = None
    if FLAGS.torch:
        import torch

        if FLAGS.threads:
            torch.set_num_threads(FLAGS.threads)
    config = FLAGS.config
    b = config.train.batch_size
    specs = config_convs(config, {"train": b})["train"]
    distinct: dict = {}
    for s in specs:
        if eligible(s):
            distinct.setdefault((tuple(s["lhs"]), tuple(s["rhs"])), [s, 0])[1] += 1
    table = []
    for (lhs, rhs), (spec, count) in distinct.items():
        progs = programs(spec, FLAGS.formulations, torch)
        times = {name: [] for name in progs}
        for _ in range(FLAGS.rounds):
            for name, fn in progs.items():
                times[name].append(timed(fn, FLAGS.iters) * 1e3)
        row = {"lhs": list(lhs), "rhs": list(rhs), "count": count}
        row.update({name: float(np.median(v)) for name, v in times.items()})
        table.append(row)
        print(
            json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}),
            flush=True,
        )
    names = [k for k in table[0] if k not in ("lhs", "rhs", "count")] if table else []
    result = {
        "train_batch": b,
        "convolutions": len(specs),
        "eligible": sum(r["count"] for r in table),
        "jax": jax.__version__,
        "torch": torch.__version__ if torch else None,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "cpu_runtime": runtime,
        "convolutions_ms": table,
        "totals_ms": {n: sum(r["count"] * r[n] for r in table) for n in names},
    }
    print_json(result, FLAGS.out)


if __name__ == "__main__":
    define_flags()
    app.run(main)
