"""Test-wide settings: CPU only, and a persistent compilation cache shared by the suite."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
CACHE_DIR = os.environ.setdefault(
    "DIFFAX_JAX_CACHE", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".jax_cache")
)

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
