"""JAX's persistent compilation cache, on by default for the lab's entry points.

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
"""

from __future__ import annotations

import os

import jax

OFF = ("off", "none", "0", "false")
ENV = "DIFFAX_JAX_CACHE"
# Compiles shorter than this are not written (JAX's default is 1 s): the lab's tiny-config
# steps compile in well under a second once warm, and reading them back is cheaper still.
MIN_COMPILE_TIME_S = 0.2


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
