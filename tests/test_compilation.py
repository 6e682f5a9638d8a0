"""The persistent compilation cache: where it goes, that it is written, and that a second
compile of the same function is served from it."""

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
