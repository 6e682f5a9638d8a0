"""The persistent compilation cache: where it goes, that it is written, and that a second
compile of the same function is served from it."""

import os

import jax
import jax.numpy as jnp
import numpy as np

from diffax_lab import compilation


def test_cache_dir_rules(monkeypatch, tmp_path):
    monkeypatch.delenv(compilation.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compilation.resolve_cache_dir() == str(tmp_path / "xdg" / "diffax_lab" / "jax")
    monkeypatch.setenv(compilation.ENV, str(tmp_path / "env"))
    assert compilation.resolve_cache_dir() == str(tmp_path / "env")
    assert compilation.resolve_cache_dir(str(tmp_path / "flag")) == str(tmp_path / "flag")
    assert compilation.resolve_cache_dir("off") is None
    monkeypatch.setenv(compilation.ENV, "off")
    assert compilation.resolve_cache_dir() is None


def test_second_compile_is_served_from_the_cache(tmp_path):
    previous = jax.config.jax_compilation_cache_dir
    previous_min = jax.config.jax_persistent_cache_min_compile_time_secs
    events = []

    def listener(event, **kwargs):
        events.append(event)

    jax.monitoring.register_event_listener(listener)
    try:
        cache_dir = compilation.enable_persistent_cache(str(tmp_path), min_compile_time_s=0.0)
        assert cache_dir == str(tmp_path)

        def f(x):  # a function no other test compiles
            return jnp.tanh(x @ x.T + 0.1234567).sum(axis=0)

        x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 8)), jnp.float32)
        first = jax.jit(f).lower(x).compile()(x)
        entries = [p for p in tmp_path.rglob("*") if p.is_file()]
        assert entries, "the first compile wrote nothing to the cache directory"
        assert "/jax/compilation_cache/cache_hits" not in events

        jax.clear_caches()  # drop the in-memory executables: only the disk can serve it
        second = jax.jit(f).lower(x).compile()(x)
        assert events.count("/jax/compilation_cache/cache_hits") == 1
        np.testing.assert_array_equal(np.asarray(first), np.asarray(second))

        assert compilation.enable_persistent_cache(enabled=False) is None
        assert not jax.config.jax_compilation_cache_dir
    finally:
        jax.monitoring.unregister_event_listener(listener)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", previous_min)
        jax.config.update("jax_compilation_cache_dir", previous)
        from jax.experimental.compilation_cache import compilation_cache

        compilation_cache.reset_cache()


def test_in_memory_executables_are_shared_only_by_the_same_program():
    """compile_lowered: a new jit of the same program (a new task of the same config) gets
    the executable compiled before; another closed-over array, shape or static argument
    is another program, and every result is that program's own."""
    devices = jax.devices()[:1]
    x = jnp.arange(4.0)

    def scaled(c):  # a fresh closure each call, as a new task builds its step
        c = jnp.asarray(c)
        return jax.jit(lambda v: v * c)

    first = compilation.compile_lowered(scaled([1.0, 2.0, 3.0, 4.0]).lower(x), devices)
    hits = compilation.stats["hits"]
    again = compilation.compile_lowered(scaled([1.0, 2.0, 3.0, 4.0]).lower(x), devices)
    assert again is first and compilation.stats["hits"] == hits + 1
    other = compilation.compile_lowered(scaled([1.0, 2.0, 3.0, 5.0]).lower(x), devices)
    assert other is not first
    np.testing.assert_array_equal(other(x), [0.0, 2.0, 6.0, 15.0])
    np.testing.assert_array_equal(first(x), [0.0, 2.0, 6.0, 12.0])
    longer = compilation.compile_lowered(scaled(2.0).lower(jnp.arange(5.0)), devices)
    np.testing.assert_array_equal(longer(jnp.arange(5.0)), 2.0 * np.arange(5.0))

    def power(v, s, n=1):
        return v**n * s

    a = compilation.Reusing(power, devices=devices, static_argnames=("n",))
    b = compilation.Reusing(power, devices=devices, static_argnames=("n",))
    np.testing.assert_array_equal(a(x, 2.0, n=2), 2.0 * x**2)
    hits = compilation.stats["hits"]
    np.testing.assert_array_equal(b(x, 3.0, n=2), 3.0 * x**2)  # s is an argument
    assert compilation.stats["hits"] == hits + 1
    np.testing.assert_array_equal(b(x, 3.0, n=3), 3.0 * x**3)  # n is part of the program
    assert compilation.stats["hits"] == hits + 1


def test_in_memory_executables_are_keyed_by_the_compile_options(monkeypatch):
    """The same program compiled under another option set ($DIFFAX_CPU_FUSIONS=off: XLA's
    default library fusions) is another executable; back under the first set, the first
    one is reused."""
    devices = jax.devices("cpu")[:1]
    monkeypatch.delenv(compilation.FUSIONS_ENV, raising=False)
    monkeypatch.setenv("XLA_FLAGS", "")  # read per call; the backend already has its flags
    x = jnp.arange(6.0)

    def lowered():
        return jax.jit(lambda v: jnp.sum(jnp.sin(v) * 3.0)).lower(x)

    assert compilation.cpu_compiler_options("cpu")  # the lab's set applies here
    lab = compilation.compile_lowered(lowered(), devices)
    monkeypatch.setenv(compilation.FUSIONS_ENV, "off")
    assert compilation.cpu_compiler_options("cpu") == {}
    default = compilation.compile_lowered(lowered(), devices)
    assert default is not lab
    np.testing.assert_allclose(default(x), lab(x), rtol=1e-6)
    monkeypatch.delenv(compilation.FUSIONS_ENV)
    assert compilation.compile_lowered(lowered(), devices) is lab


def test_cpu_compiler_options_rules(monkeypatch):
    monkeypatch.delenv(compilation.FUSIONS_ENV, raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
    options = compilation.cpu_compiler_options("cpu")
    assert options == {
        "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT,"
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_ELTWISE"
    }
    assert compilation.cpu_compiler_options("cpu", training=True) == {
        "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT,"
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
    }
    assert compilation.cpu_compiler_options("gpu") == {}
    monkeypatch.setenv(compilation.FUSIONS_ENV, "off")
    assert compilation.cpu_compiler_options("cpu") == {}
    monkeypatch.delenv(compilation.FUSIONS_ENV)
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=+eltwise")
    assert compilation.cpu_compiler_options("cpu") == {}  # the user's own setting wins


def _conv_silu(x, w, b):
    y = jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jax.nn.silu(y + b)


_FUSION_PROBE = """
import jax, jax.numpy as jnp, numpy as np
from diffax_lab import compilation
from tests.test_compilation import _conv_silu
rng = np.random.default_rng(0)
x, w, b = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in [(8, 28, 28, 32), (3, 3, 32, 32), (32,)])
lowered = jax.jit(_conv_silu).lower(x, w, b)
train = compilation.compile_with_options(lowered, "cpu", training=True)
infer = compilation.compile_with_options(lowered, "cpu")
plain = lowered.compile()
def xla_convs(c):  # convolutions XLA runs itself (not inside a YNNPACK fusion)
    return c.as_text().split("ENTRY")[1].count(" convolution(")
def kernels(c):
    entry = c.as_text().split("ENTRY")[1]
    return entry.count(" fusion(") + entry.count(" convolution(")
# Sums of 288 products of size ~17: float32 summation order differs at ~2e-5.
for c in (train, infer):
    np.testing.assert_allclose(c(x, w, b), plain(x, w, b), rtol=1e-5, atol=1e-4)
print(xla_convs(train), xla_convs(plain), kernels(infer), kernels(plain))
"""


def test_fusion_options_keep_the_values_and_change_the_kernels():
    """With XLA's default flags (what ``main`` runs; the tests' own optimisation-level flag
    turns library fusions off): a train step's convolution runs as XLA's own where the
    defaults hand it to YNNPACK, inference puts convolution, bias and SiLU in one kernel
    where the defaults use two, and the values agree."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", compilation.FUSIONS_ENV)}
    env["JAX_PLATFORMS"] = "cpu"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", _FUSION_PROBE], env=env, cwd=root, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert tuple(map(int, out.stdout.split()[-4:])) == (1, 0, 1, 2)


def test_a_refused_option_falls_back_to_a_plain_compile(monkeypatch):
    monkeypatch.delenv(compilation.FUSIONS_ENV, raising=False)
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setattr(compilation, "CPU_YNN_FUSIONS", ("NO_SUCH_FUSION",))
    monkeypatch.setattr(compilation, "_refused", set())
    x = jnp.ones((2, 5, 5, 3))
    w, b = jnp.ones((3, 3, 3, 3)), jnp.ones((3,))
    compiled = compilation.compile_with_options(jax.jit(_conv_silu).lower(x, w, b), "cpu")
    np.testing.assert_allclose(compiled(x, w, b), _conv_silu(x, w, b), rtol=1e-5)
    assert compilation.cpu_compiler_options("cpu") == {}  # not asked again


# ----- configure_cpu_runtime: XLA:CPU's per-execution buffers stay in the process -----
_FAULT_PROBE = r"""
import json, os, resource, sys
from diffax_lab import compilation
if sys.argv[1] == "jax_first":  # a program runs before the lab is configured
    import jax.numpy as jnp
    jnp.zeros(1).block_until_ready()
setting = compilation.configure_cpu_runtime()
import jax, jax.numpy as jnp
n = 24 << 20  # a fresh 96 MiB output a call: above glibc's largest mmap threshold (32 MiB)
f = jax.jit(lambda x: x * 2 + 1)
x = jnp.ones(n)
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    out = jax.block_until_ready(f(x))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del out
print(json.dumps({"setting": setting, "faults": faults[3:], "pages": n * 4 // 4096}))
"""


def _fault_probe(first: str = "lab_first", **env_changes):
    """Runs _FAULT_PROBE in a fresh process with ``env_changes``; ``first="jax_first"`` runs
    a program before the lab is configured."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != compilation.RUNTIME_ENV}
    for k in ("GLIBC_TUNABLES", "LD_PRELOAD", "JAX_CPU_ENABLE_ASYNC_DISPATCH"):
        env.pop(k, None)
    env.update(env_changes, JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", _FAULT_PROBE, first], env=env, cwd=root, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cpu_runtime_keeps_buffers_across_executions():
    """Configured, a program's fresh outputs reuse the pages the last call freed; with
    JAX's and glibc's defaults every call faults in new pages (the mechanism behind the
    train step's 25,000 page faults, docs/BENCHMARKS.md). Now and then a call still finds
    no free block to reuse (small allocations split the freed one) and the heap grows, so
    the bound is on the median call."""
    on = _fault_probe()
    assert on["setting"] == {
        "dispatch": "inline",
        "malloc": "kept (glibc: M_MMAP_MAX=0, M_TRIM_THRESHOLD=-1)",
    }
    assert np.median(on["faults"]) < 0.1 * on["pages"], on
    off = _fault_probe(**{compilation.RUNTIME_ENV: "off"})
    assert off["setting"]["dispatch"].startswith("unchanged ($DIFFAX_CPU_RUNTIME=off")
    assert min(off["faults"]) > 0.5 * off["pages"], off


def test_cpu_runtime_stands_down_to_the_users_choices():
    tuned = _fault_probe(GLIBC_TUNABLES="glibc.malloc.mmap_max=0")
    assert tuned["setting"] == {
        "dispatch": "inline",
        "malloc": "unchanged (GLIBC_TUNABLES sets glibc.malloc)",
    }
    asynchronous = _fault_probe(JAX_CPU_ENABLE_ASYNC_DISPATCH="true")
    assert asynchronous["setting"]["dispatch"] == (
        "unchanged ($JAX_CPU_ENABLE_ASYNC_DISPATCH is set)"
    )
    late = _fault_probe(first="jax_first")  # too late to change how JAX dispatches
    assert late["setting"]["dispatch"].startswith("unchanged (JAX's backends existed")
    assert late["setting"]["malloc"].startswith("kept")


def test_user_malloc_choices_are_recognised(monkeypatch):
    for k in ("GLIBC_TUNABLES", "LD_PRELOAD", *compilation._USER_MALLOC_ENV):
        monkeypatch.delenv(k, raising=False)
    assert compilation._user_chose_malloc() == ""
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.rtld.nns=2")  # not malloc's
    assert compilation._user_chose_malloc() == ""
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert compilation._user_chose_malloc() == "LD_PRELOAD loads jemalloc"
    monkeypatch.delenv("LD_PRELOAD")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert compilation._user_chose_malloc() == "$MALLOC_TRIM_THRESHOLD_ is set"
