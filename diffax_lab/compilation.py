"""JAX's persistent compilation cache, on by default for the lab's entry points; the compile
options of CPU programs; and how XLA:CPU runs them (``configure_cpu_runtime``, at the end).

A compiled step is written to disk keyed by its HLO, the compile options, the backend and
the jax/jaxlib versions, so a second run of the same config (same shapes) loads it instead
of compiling again. ``diffax_lab.main`` and ``diffax_lab.api`` call
``enable_persistent_cache()`` once at start-up. The directory, first match wins:

1. the ``path`` argument (``--jax_cache_dir`` of main.py);
2. ``$DIFFAX_JAX_CACHE``;
3. ``$XDG_CACHE_HOME/diffax_lab/jax``, else ``~/.cache/diffax_lab/jax``.

``off`` (argument or environment variable) or ``enabled=False`` (``--nocompilation_cache``)
turns it off. The cache lives in the user's cache directory, never in a run's workdir:
entries are shared by every run and safe to delete at any time (``rm -r`` the directory).

Reading an entry back is not free on XLA:CPU (its cost grows with the program's number of
kernels: 7 s for a tiny U-Net's train step on 2 cores with its update per parameter leaf,
under 1 s with the update on one vector, ``optimizer.py``), so ``compile_lowered`` also
keeps the executables this process compiled in memory, keyed by the program's full text: a
second ``train.run`` of the same config in one process (a notebook, a sweep run
in-process, the tests) reuses the executable at the cost of lowering (about 1 s).
"""

from __future__ import annotations

import collections
import hashlib
import os
import threading

import jax

OFF = ("off", "none", "0", "false")
ENV = "DIFFAX_JAX_CACHE"
# Compiles shorter than this are not written (JAX's default is 1 s): the lab's tiny-config
# steps compile in well under a second once warm, and reading them back is cheaper still.
MIN_COMPILE_TIME_S = 0.2


def _env_off(name: str) -> bool:
    """``$name`` says off ("off", "none", "0" or "false", any case)."""
    return os.environ.get(name, "").strip().lower() in OFF


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "diffax_lab", "jax")


def resolve_cache_dir(path: str | None = None) -> str | None:
    """The cache directory the rules above choose, or None when the cache is off."""
    chosen = path or os.environ.get(ENV, "") or default_cache_dir()
    return None if chosen.strip().lower() in OFF else os.path.abspath(os.path.expanduser(chosen))


def enable_persistent_cache(
    path: str | None = None,
    *,
    enabled: bool = True,
    min_compile_time_s: float = MIN_COMPILE_TIME_S,
) -> str | None:
    """Points JAX's persistent compilation cache at the chosen directory (created if need
    be); returns it, or None when the cache is off. Safe to call again: a new directory
    replaces the old one for every later compile."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    cache_dir = resolve_cache_dir(path) if enabled else None
    current = jax.config.jax_compilation_cache_dir
    if cache_dir is None:
        if current:
            jax.config.update("jax_compilation_cache_dir", None)
            cc.reset_cache()
        return None
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:  # read-only home, full disk: run on without the cache
        from absl import logging

        logging.warning("Compilation cache off: cannot create %s (%s).", cache_dir, e)
        return None
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_s)
    if current != cache_dir:
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        cc.reset_cache()  # the cache object binds its directory when it is first used
    return cache_dir


# Executables this process compiled, by program: (sha256 of the lowered module's text,
# device ids) -> jax.stages.Compiled. Least recently used first; at most MAX_IN_MEMORY.
MAX_IN_MEMORY = 16
_in_memory: collections.OrderedDict = collections.OrderedDict()
_lock = threading.Lock()
stats = {"hits": 0, "misses": 0}


# XLA:CPU hands parts of a program to YNNPACK ("library fusions"): by default dots,
# reductions and each convolution on its own. Without the last, convolutions run as XLA's
# own, which made the lab's CPU configs faster in training and in the forward pass. For
# inference (sampling, evaluation) YNNPACK's element-wise fusions are added too: a
# convolution then carries its bias and activation in one kernel. In a train step those
# cost 4-13% (XLA materialised broadcasts for them), so training leaves them out. On the
# 2-core CPU (benchmarks/cpu_levers.py, XLA's defaults -> these): the cpu config 122 -> 162
# train and 449 -> 718 forward images/s, tiny 182 -> 208 and 840 -> 1025
# (docs/BENCHMARKS.md "Speed and scale"). REDUCE alone is worth 38-44% in training
# (cpu_levers --variants=all,no_reduce_fusion). The option is experimental in XLA: a
# jaxlib that refuses it compiles with its defaults.
CPU_YNN_FUSIONS = ("DOT", "INDIVIDUAL_DOT", "REDUCE")
CPU_YNN_INFERENCE_FUSIONS = ("ELTWISE",)  # added outside train steps
_YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"
FUSIONS_ENV = "DIFFAX_CPU_FUSIONS"  # "off": XLA's default library fusions
_refused: set[str] = set()


def cpu_compiler_options(platform: str | None = None, training: bool = False) -> dict[str, str]:
    """The compile options the lab's programs use on ``platform`` (default: JAX's default
    backend): the YNNPACK fusion set above on the CPU (with the inference additions unless
    ``training``, a train step); nothing elsewhere, when
    ``$DIFFAX_CPU_FUSIONS`` is off, when XLA_FLAGS already sets the option (the user's
    choice wins), or after this jaxlib refused it once."""
    platform = platform or jax.default_backend()
    if (
        platform != "cpu"
        or _env_off(FUSIONS_ENV)
        or _YNN_OPTION in os.environ.get("XLA_FLAGS", "")
        or _YNN_OPTION in _refused
    ):
        return {}
    kinds = CPU_YNN_FUSIONS if training else CPU_YNN_FUSIONS + CPU_YNN_INFERENCE_FUSIONS
    kinds = tuple(dict.fromkeys(kinds))  # once each (a set that already has ELTWISE)
    return {_YNN_OPTION: ",".join(f"LIBRARY_FUSION_TYPE_{t}" for t in kinds)}


def compile_with_options(
    lowered: jax.stages.Lowered, platform: str | None = None, training: bool = False
):
    """``lowered.compile`` with ``cpu_compiler_options``; a jaxlib that does not know the
    option (it is experimental) gets a plain compile, and is not asked again."""
    return _compile(lowered, cpu_compiler_options(platform, training))


def _compile(lowered: jax.stages.Lowered, options: dict[str, str]):
    if not options:
        return lowered.compile()
    try:
        return lowered.compile(compiler_options=options)
    except Exception as e:  # XlaRuntimeError: INVALID_ARGUMENT naming the option
        if _YNN_OPTION not in str(e):
            raise
        from absl import logging

        logging.warning("This jaxlib refuses %s; compiling with its defaults.", _YNN_OPTION)
        _refused.add(_YNN_OPTION)
        return lowered.compile()


def compile_lowered(
    lowered: jax.stages.Lowered, devices=(), training: bool = False
) -> jax.stages.Compiled:
    """``lowered.compile()`` (with ``cpu_compiler_options``), reusing an executable this
    process compiled before from the same program on the same ``devices`` (those of the
    mesh it runs on).

    The key is the whole module text (shapes, shardings, donation and every constant a
    function closes over, such as frozen weights), so two programs share an executable
    only when XLA would be handed the same input: a different config, shape, mesh,
    closed-over array or set of compile options (``cpu_compiler_options``, which
    ``$DIFFAX_CPU_FUSIONS`` changes) is a different key. Nothing but compiled programs is
    kept.
    """
    text = lowered.as_text(debug_info=False)
    platform = devices[0].platform if devices else None
    options = cpu_compiler_options(platform, training)
    key = (
        hashlib.sha256(text.encode()).hexdigest(),
        tuple(int(d.id) for d in devices),
        tuple(sorted(options.items())),
    )
    with _lock:
        compiled = _in_memory.get(key)
        if compiled is not None:
            _in_memory.move_to_end(key)
            stats["hits"] += 1
            return compiled
    compiled = _compile(lowered, options)  # the options of the key
    with _lock:
        stats["misses"] += 1
        _in_memory[key] = compiled
        while len(_in_memory) > MAX_IN_MEMORY:
            _in_memory.popitem(last=False)
    return compiled


def clear_in_memory() -> None:
    """Forgets the executables ``compile_lowered`` keeps (their memory is freed once no
    step holds them)."""
    with _lock:
        _in_memory.clear()


def _signature(x):
    if isinstance(x, jax.Array):
        return (x.shape, x.dtype, x.sharding, x.weak_type)
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return (x.shape, x.dtype)
    return type(x)


class Reusing:
    """``jax.jit(fun, **jit_kwargs)`` whose executables come from ``compile_lowered``: a
    new instance (a new task, a new run) calling with the same program reuses what this
    process compiled. ``lower`` is the jitted function's own. Static arguments are named in
    ``static_argnames`` and passed by keyword."""

    def __init__(self, fun, *, devices=(), static_argnames=(), **jit_kwargs):
        self._jitted = jax.jit(fun, static_argnames=static_argnames, **jit_kwargs)
        self._static = frozenset(static_argnames)
        self._devices = tuple(devices)
        self._by_signature: dict = {}

    def lower(self, *args, **kwargs):
        return self._jitted.lower(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        static = {k: kwargs.pop(k) for k in list(kwargs) if k in self._static}
        leaves, treedef = jax.tree.flatten((args, kwargs))
        sig = (treedef, tuple(sorted(static.items())), tuple(map(_signature, leaves)))
        compiled = self._by_signature.get(sig)
        if compiled is None:
            lowered = self._jitted.lower(*args, **kwargs, **static)
            compiled = self._by_signature[sig] = compile_lowered(lowered, self._devices)
        return compiled(*args, **kwargs)


# ----- how XLA:CPU runs the programs: memory and dispatch -----
# XLA:CPU gives each execution of a program one "preallocated temp" buffer for all its
# intermediate values, allocated when the execution starts and freed when it ends: 102 MB
# for the tiny U-Net's train step. glibc serves a block that large with a fresh mmap: it
# is above glibc's largest mmap threshold (32 MiB), and JAX runs the step on a worker
# thread, whose malloc arena (heaps of at most 64 MiB) falls back to mmap for it even with
# mmap turned off. So every step touched 102 MB of new pages: 24,972 page faults a step,
# each mapped and zeroed by the kernel (20 of the 47 s of a 120-step cpu-config training
# run were system time on the 2-core machine). Two settings keep the memory in the
# process instead:
# - glibc's mallopt: no mmap for large blocks (M_MMAP_MAX=0) and no return of freed
#   memory to the system (M_TRIM_THRESHOLD=-1, "never" in glibc's manual), so the next
#   step's buffer reuses the pages of the last one;
# - XLA:CPU runs a program on the calling thread (JAX's ``jax_cpu_enable_async_dispatch``
#   off) instead of a worker thread, so the buffer comes from the main arena, the only
#   one whose heap may grow past 64 MB without mmap.
# Together they took the tiny config from 24,972 to 210 page faults a step and its
# training from 180 to 293 images/s (docs/BENCHMARKS.md, "the page faults";
# benchmarks/cpu_runtime.py).
# Inline dispatch alone changed nothing; the allocator settings alone helped the forward
# pass but left the train step's buffer (from a worker thread) on mmap. The cost: the
# process holds on to its peak memory (its RSS does not shrink after a peak), much as
# under jemalloc or tcmalloc, and Python waits for each CPU program instead of queueing
# the next (on the CPU the host and the program share the same cores).
RUNTIME_ENV = "DIFFAX_CPU_RUNTIME"  # "off": JAX's and glibc's defaults
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's malloc.h
_NEVER_TRIM = -1  # glibc's manual: "Setting M_TRIM_THRESHOLD to -1 disables trimming"
_USER_MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")
_runtime: dict[str, str] = {}


def _glibc():
    """glibc through ctypes, or None (another libc, another OS)."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def _user_chose_malloc() -> str:
    """Why the user's own allocator settings stand (empty when they set none)."""
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets glibc.malloc"
    for name in _USER_MALLOC_ENV:
        if name in os.environ:
            return f"${name} is set"
    preload = os.environ.get("LD_PRELOAD", "")
    for lib in ("jemalloc", "tcmalloc", "mimalloc"):
        if lib in preload:
            return f"LD_PRELOAD loads {lib}"
    return ""


def configure_cpu_runtime(initialize_backend: bool = True) -> dict[str, str]:
    """Keeps XLA:CPU's per-execution buffers in the process (see above), when the lab's
    programs run on the CPU. Call once at start-up, before anything has run: JAX reads the
    dispatch setting when it creates its CPU client. The memory part needs to know the
    backend, which creates it; with ``initialize_backend=False`` it waits for a later call
    while the backends do not exist yet (``main.py`` calls it so before
    ``jax.distributed.initialize``, and again after). Returns what it set, by part
    ("dispatch", "malloc"), each with the reason when it set nothing. Safe to call again.

    Each part stands down to a choice the user made: ``$DIFFAX_CPU_RUNTIME=off`` (both),
    ``$JAX_CPU_ENABLE_ASYNC_DISPATCH`` (the dispatch), and glibc malloc tunables, glibc's
    ``MALLOC_*_`` variables or an allocator in ``LD_PRELOAD`` (the memory). With an
    accelerator as the default backend the memory is left as it is, and only the CPU
    client's dispatch changes, which the lab's programs do not use there.
    """
    from jax._src import xla_bridge

    if _env_off(RUNTIME_ENV):
        return {"dispatch": f"unchanged (${RUNTIME_ENV}=off)", "malloc": "unchanged"}
    if "dispatch" not in _runtime:
        if "JAX_CPU_ENABLE_ASYNC_DISPATCH" in os.environ:
            _runtime["dispatch"] = "unchanged ($JAX_CPU_ENABLE_ASYNC_DISPATCH is set)"
        elif xla_bridge.backends_are_initialized():
            _runtime["dispatch"] = (
                "unchanged (JAX's backends existed before configure_cpu_runtime; "
                "import diffax_lab before running anything with JAX)"
            )
        else:
            jax.config.update("jax_cpu_enable_async_dispatch", False)
            _runtime["dispatch"] = "inline"
    if "malloc" not in _runtime and (initialize_backend or xla_bridge.backends_are_initialized()):
        if jax.default_backend() != "cpu":
            _runtime["malloc"] = f"unchanged (the backend is {jax.default_backend()})"
        elif reason := _user_chose_malloc():
            _runtime["malloc"] = f"unchanged ({reason})"
        elif (libc := _glibc()) is None:
            _runtime["malloc"] = "unchanged (not glibc)"
        elif libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM):
            _runtime["malloc"] = "kept (glibc: M_MMAP_MAX=0, M_TRIM_THRESHOLD=-1)"
        else:
            _runtime["malloc"] = "unchanged (glibc refused mallopt)"
    return dict(_runtime)
