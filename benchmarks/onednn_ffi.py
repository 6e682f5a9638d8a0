"""oneDNN's convolutions inside XLA:CPU programs, through XLA's FFI: a diagnostic.

Can the lab's CPU train step reach PyTorch by running oneDNN's convolutions (PyTorch's
CPU kernels) in place of XLA:CPU's? This module makes that measurable. It registers custom
call targets with XLA's typed FFI whose handler is a Python function (a ``ctypes``
callback, no compiler needed) that hands XLA's buffers to PyTorch without copying
(``torch.ops.aten.convolution`` / ``convolution_backward``, channels-last) and writes into
XLA's output buffers. ``register_conv_impls()`` adds them to ``layers.CONV_IMPLS``, so a
network runs them with no change to the model code:

- ``onednn_dw``: forward and input gradient XLA's, the kernel gradient oneDNN's on one
  thread (beside XLA's threads, which go on with the independent work);
- ``onednn_dw_2t``: the same on PyTorch's threads;
- ``onednn_all``: forward, input and kernel gradients all oneDNN's, on PyTorch's threads.

``benchmarks/cpu_levers.py`` prices them in the whole step (variants ``conv_onednn_dw``,
``conv_onednn_dw_2t`` and ``conv_onednn_all``) and ``benchmarks/kernel_grad.py`` times
the kernel gradient alone (formulations ``onednn_ffi`` and ``onednn_ffi_1t``);
docs/BENCHMARKS.md has the figures.
They are not the lab's defaults: in the step they did not pay (the sixth pass there).

Why not ``jax.pure_callback``: XLA:CPU does not write programs with host callbacks to the
persistent compilation cache, and the callback's argument handling cost more than the
kernel gradient it called. A registered FFI target is named in the program like any
custom call. The structures below mirror ``xla/ffi/api/c_api.h`` (shipped with jaxlib,
``jax.ffi.include_dir()``): a versioned C ABI whose structs only grow at their end, so
the fields read here keep their offsets across jaxlib releases.
"""

from __future__ import annotations

import ctypes
import functools
import threading

import jax
import numpy as np

_p = ctypes.c_void_p
_METADATA_EXTENSION = 1  # XLA_FFI_Extension_Metadata
_EXECUTE = 3  # XLA_FFI_ExecutionStage_EXECUTE
_F32 = 11  # XLA_FFI_DataType_F32 (xla::PrimitiveType F32)
_INTERNAL = 13  # XLA_FFI_Error_Code_INTERNAL


class _ExtensionBase(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("type", ctypes.c_int), ("next", _p)]


class _ApiVersion(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", _p),
        ("major_version", ctypes.c_int),
        ("minor_version", ctypes.c_int),
    ]


class _Metadata(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("api_version", _ApiVersion),
        ("traits", ctypes.c_uint32),
        ("state_type_id", ctypes.c_int64),
    ]


class _MetadataExtension(ctypes.Structure):
    _fields_ = [("extension_base", _ExtensionBase), ("metadata", ctypes.POINTER(_Metadata))]


class _Buffer(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", _p),
        ("dtype", ctypes.c_int),
        ("data", _p),
        ("rank", ctypes.c_int64),
        ("dims", ctypes.POINTER(ctypes.c_int64)),
    ]


class _Args(ctypes.Structure):  # also XLA_FFI_Rets: the same layout
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", _p),
        ("size", ctypes.c_int64),
        ("types", ctypes.POINTER(ctypes.c_int)),
        ("args", ctypes.POINTER(ctypes.POINTER(_Buffer))),
    ]


class _Attrs(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", _p),
        ("size", ctypes.c_int64),
        ("types", _p),
        ("names", _p),
        ("attrs", _p),
    ]


class _ErrorCreateArgs(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", _p),
        ("message", ctypes.c_char_p),
        ("errc", ctypes.c_int),
    ]


_ERROR_CREATE = ctypes.CFUNCTYPE(_p, ctypes.POINTER(_ErrorCreateArgs))


class _Api(ctypes.Structure):  # the leading fields of XLA_FFI_Api
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", _p),
        ("api_version", _ApiVersion),
        ("internal_api", _p),
        ("error_create", _ERROR_CREATE),
    ]


class _CallFrame(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", ctypes.POINTER(_ExtensionBase)),
        ("api", ctypes.POINTER(_Api)),
        ("ctx", _p),
        ("stage", ctypes.c_int),
        ("args", _Args),
        ("rets", _Args),
        ("attrs", _Attrs),
        ("future", _p),
    ]


_HANDLER = ctypes.CFUNCTYPE(_p, ctypes.POINTER(_CallFrame))
_registered: dict[str, tuple] = {}  # name -> (handler, capsule): kept alive for XLA
_lock = threading.Lock()  # registration, and PyTorch's thread setting (process-wide)


def _array(buffer) -> np.ndarray:
    """An XLA float32 buffer (row-major, as ``jax.ffi.ffi_call`` lays it out) as a numpy
    view of the same memory."""
    b = buffer.contents
    if b.dtype != _F32:
        raise TypeError(f"expected a float32 buffer, got XLA data type {b.dtype}")
    shape = tuple(int(b.dims[i]) for i in range(b.rank))
    n = int(np.prod(shape, dtype=np.int64))
    return np.ctypeslib.as_array((ctypes.c_float * n).from_address(b.data)).reshape(shape)


def _error(frame, message: str):
    args = _ErrorCreateArgs(ctypes.sizeof(_ErrorCreateArgs), None, message.encode(), _INTERNAL)
    return frame.api.contents.error_create(ctypes.byref(args))


def _make_handler(compute):
    """An XLA FFI handler (``XLA_FFI_Error* (*)(XLA_FFI_CallFrame*)``) that calls
    ``compute(inputs, outputs)`` on numpy views of XLA's buffers. It answers XLA's metadata
    query (the API version it was built against: the runtime's own), does nothing at the
    stages before execution, and turns an exception into an XLA error, so that a failure
    raises in the caller instead of leaving the output unwritten."""

    def handler(frame_ptr):
        frame = frame_ptr.contents
        try:
            if frame.extension_start and frame.extension_start.contents.type == _METADATA_EXTENSION:
                ext = ctypes.cast(frame.extension_start, ctypes.POINTER(_MetadataExtension))
                metadata = ext.contents.metadata.contents
                version = frame.api.contents.api_version
                metadata.api_version.major_version = version.major_version
                metadata.api_version.minor_version = version.minor_version
                metadata.traits = 0
                metadata.state_type_id = 0
                return None
            if frame.stage != _EXECUTE:
                return None
            ins = [_array(frame.args.args[i]) for i in range(frame.args.size)]
            outs = [_array(frame.rets.args[i]) for i in range(frame.rets.size)]
            compute(ins, outs)
            return None
        except BaseException as e:  # noqa: BLE001 - every failure must reach XLA as an error
            return _error(frame, f"onednn_ffi: {type(e).__name__}: {e}")

    return _HANDLER(handler)


def _register(name: str, compute) -> None:
    with _lock:
        if name in _registered:
            return
        handler = _make_handler(compute)
        new_capsule = ctypes.pythonapi.PyCapsule_New
        new_capsule.restype = ctypes.py_object
        new_capsule.argtypes = (_p, ctypes.c_char_p, _p)
        capsule = new_capsule(ctypes.cast(handler, _p), None, None)
        jax.ffi.register_ffi_target(name, capsule, platform="cpu", api_version=1)
        _registered[name] = (handler, capsule)


def _torch_run(threads: int, fn):
    """``fn()`` with PyTorch on ``threads`` threads (0: as set), the setting restored."""
    import torch

    if not threads:
        return fn()
    with _lock:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return fn()
        finally:
            torch.set_num_threads(before)


def _nchw(a):
    """An NHWC numpy array as PyTorch's NCHW view of the same memory (channels-last)."""
    import torch

    return torch.from_numpy(a).permute(0, 3, 1, 2)


def _oihw(kernel):
    """An HWIO numpy kernel as PyTorch's OIHW, channels-last ([O, H, W, I] memory)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 0, 1, 2))).permute(0, 3, 1, 2)


def _blank(shape_nhwc):
    """An uninitialised NCHW channels-last tensor: convolution_backward reads only its shape
    and memory format for the operand whose gradient it does not compute."""
    import torch

    b, h, w, c = shape_nhwc
    return torch.empty((b, h, w, c)).permute(0, 3, 1, 2)


def _forward(ins, outs, strides, padding, threads):
    import torch

    x, kernel = ins
    (y,) = outs
    conv = torch.ops.aten.convolution
    geometry = (list(strides), list(padding), [1, 1], False, [0, 0], 1)
    r = _torch_run(threads, lambda: conv(_nchw(x), _oihw(kernel), None, *geometry))
    torch.from_numpy(y).copy_(r.permute(0, 2, 3, 1))


def _backward(ins, outs, strides, padding, threads, which):
    """convolution_backward for the input gradient (``which`` "x": ins = dy, kernel; outs =
    dx) or the kernel gradient ("w": ins = x, dy; outs = dW)."""
    import torch

    if which == "x":
        dy, kernel = ins
        (dx,) = outs
        x_like, w = _blank(dx.shape), _oihw(kernel)
        mask = [True, False, False]
    else:
        x, dy = ins
        (dw,) = outs
        kh, kw, cin, cout = dw.shape
        x_like, w = _nchw(x), _blank((cout, kh, kw, cin))
        mask = [False, True, False]
    backward = torch.ops.aten.convolution_backward
    geometry = (list(strides), list(padding), [1, 1], False, [0, 0], 1)
    grads = _torch_run(threads, lambda: backward(_nchw(dy), x_like, w, None, *geometry, mask))
    if which == "x":
        torch.from_numpy(dx).copy_(grads[0].permute(0, 2, 3, 1))
    else:
        torch.from_numpy(dw).copy_(grads[1].permute(2, 3, 1, 0))


def _call(kind, compute, out_shape, strides, padding, threads, *operands):
    name = "diffax_onednn_{}_s{}x{}_p{}x{}_t{}".format(kind, *strides, *padding, threads)
    _register(name, functools.partial(compute, strides=strides, padding=padding, threads=threads))
    out = jax.ShapeDtypeStruct(tuple(out_shape), np.float32)
    return jax.ffi.ffi_call(name, out, vmap_method="sequential")(*operands)


def conv_forward(x, kernel, out_shape, strides=(1, 1), padding=(1, 1), threads=0):
    """y of an NHWC x and HWIO kernel (float32, symmetric zero ``padding`` (rows, columns),
    no dilation, one group), by oneDNN on ``threads`` threads (0: PyTorch's setting)."""
    return _call("fwd", _forward, out_shape, tuple(strides), tuple(padding), threads, x, kernel)


def conv_input_grad(dy, kernel, x_shape, strides=(1, 1), padding=(1, 1), threads=0):
    """dx of the same convolution for the output gradient ``dy``."""
    fn = functools.partial(_backward, which="x")
    return _call("dx", fn, x_shape, tuple(strides), tuple(padding), threads, dy, kernel)


def conv_kernel_grad(x, dy, kernel_shape, strides=(1, 1), padding=(1, 1), threads=0):
    """dW (HWIO) of the same convolution for the input ``x`` and output gradient ``dy``."""
    fn = functools.partial(_backward, which="w")
    return _call("dw", fn, kernel_shape, tuple(strides), tuple(padding), threads, x, dy)


def conv_impl(pieces: str, threads: int):
    """A ``layers.CONV_IMPLS`` function: the convolution with the ``pieces`` ("f" forward,
    "x" input gradient, "w" kernel gradient) by oneDNN on ``threads`` threads, the others
    XLA's. Convolutions oneDNN cannot take as they are (asymmetric padding, not float32)
    stay XLA's whole."""
    from diffax_lab.models import layers

    def forward(x, kernel, strides, pads):
        shape = jax.eval_shape(lambda: layers.xla_conv(x, kernel, strides, pads)).shape
        return conv_forward(x, kernel, shape, strides, _sym(pads), threads)

    conv = layers.conv_from_pieces(
        forward if "f" in pieces else None,
        (
            (lambda g, k, x_shape, s, p: conv_input_grad(g, k, x_shape, s, _sym(p), threads))
            if "x" in pieces
            else None
        ),
        (
            (lambda x, g, k_shape, s, p: conv_kernel_grad(x, g, k_shape, s, _sym(p), threads))
            if "w" in pieces
            else None
        ),
    )

    def impl(x, kernel, strides, pads, precision):
        symmetric = all(lo == hi for lo, hi in pads)
        if not symmetric or x.dtype != np.float32 or kernel.dtype != np.float32:
            return layers.xla_conv(x, kernel, strides, pads, precision)
        return conv(x, kernel, strides, pads, precision)

    return impl


def _sym(pads):
    return (pads[0][0], pads[1][0])


IMPLS = {"onednn_dw": ("w", 1), "onednn_dw_2t": ("w", 0), "onednn_all": ("fxw", 0)}


def register_conv_impls() -> list[str]:
    """Adds ``IMPLS`` to ``layers.CONV_IMPLS``; returns their names."""
    from diffax_lab.models import layers

    for name, (pieces, threads) in IMPLS.items():
        if name not in layers.CONV_IMPLS:
            layers.register_conv_impl(name, conv_impl(pieces, threads))
    return list(IMPLS)
