"""Test-wide settings: CPU only, and a persistent compilation cache shared by the suite."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile many tiny programs once each: LLVM's optimisation passes cost more time than
# they save there (measured: train-step compile 13.4 s -> 7.5 s, step time 0.53 s -> 0.63 s).
# Subprocesses started by the tests inherit this and the cache directory below.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()
CACHE_DIR = os.environ.setdefault(
    "DIFFAX_JAX_CACHE", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".jax_cache")
)

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", CACHE_DIR)

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: end-to-end runs (subprocesses, training); `make test-fast` skips them"
    )
    config.addinivalue_line(
        "markers",
        "heavy: multi-stage end-to-end runs (notebooks at small parameters, cascades, sweeps) "
        "that do not fit the 10-minute CI budget on 2 cores; `make test-heavy` runs them",
    )


# Shared across test files (once per xdist worker): the tiny fake dataset and a tiny
# diffusion run trained on it, four steps with checkpoints at 2 and 4. Tests copy the
# workdir before they change it.
import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    from tests.helpers import write_fake_idx

    return write_fake_idx(tmp_path_factory.mktemp("idx"), n_train=64, n_test=32)


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory):
    """(final state on the host, workdir) of configs/ddpm.py:tiny on ``tiny_data``."""
    from diffax_lab.modes import train
    from tests.helpers import tiny_config

    workdir = tmp_path_factory.mktemp("tiny_run")
    state = train.run(tiny_config(tiny_data), str(workdir))
    return jax.device_get(state), str(workdir)


@pytest.fixture(scope="session")
def tiny_clip(tiny_data, tmp_path_factory):
    """(config, workdir) of configs/clip.py:tiny trained on ``tiny_data``; its Hugging Face
    export is ``workdir/hf_clip``. Tests only read it (evaluation writes under eval/)."""
    from diffax_lab.modes import train
    from tests.helpers import load_config

    config = load_config("clip.py", "tiny")
    config.data.dir, config.data.num_examples = str(tiny_data), 0
    workdir = str(tmp_path_factory.mktemp("tiny_clip"))
    train.run(config, workdir)
    return config, workdir
