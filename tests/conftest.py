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

# XLA:CPU's older elemental emitters compile the tests' programs faster than its fusion
# emitters (the tiny U-Net's train step: 25.5 s -> 18.2 s cold on 2 cores,
# benchmarks/compile_time.py); results are equal up to floating-point order. An XLA that no
# longer knows the flag would refuse to start, so it is probed once, in pytest's main
# process: xdist workers and the tests' subprocesses inherit the environment.
FUSION_FLAG = "--xla_cpu_use_fusion_emitters=false"


def _xla_accepts(flags: str) -> bool:
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    probe = [sys.executable, "-c", "import jax; jax.devices()"]
    try:
        return subprocess.run(probe, env=env, capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


_flags = os.environ["XLA_FLAGS"]
if (
    "PYTEST_XDIST_WORKER" not in os.environ
    and "xla_cpu_use_fusion_emitters" not in _flags
    and _xla_accepts(f"{_flags} {FUSION_FLAG}")
):
    os.environ["XLA_FLAGS"] = f"{_flags} {FUSION_FLAG}"
CACHE_DIR = os.environ.setdefault(
    "DIFFAX_JAX_CACHE", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".jax_cache")
)

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", CACHE_DIR)

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

from diffax_lab import compilation  # noqa: E402

# As the lab's entry points do: XLA:CPU's per-execution buffers stay in the process
# (compilation.configure_cpu_runtime; each xdist worker is a process of its own).
compilation.configure_cpu_runtime()


def pytest_collection_modifyitems(config, items):
    """The notebook runs, the suite's longest tests (50-80 s each of a worker), go first.
    pytest-xdist (--dist worksteal) gives each worker a contiguous share of this order and
    idle workers take tests from the end of another's share; a long test that started
    late would leave one worker running alone at the end of the suite."""
    first = "tests/test_notebooks.py::test_notebook_runs_at_small_parameters"
    items.sort(key=lambda item: not item.nodeid.startswith(first))  # stable: the rest keep order


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: end-to-end runs (subprocesses, training); `make test-fast` skips them"
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


# DIFFAX_COMPILE_REPORT=FILE: per test, the seconds this process spent compiling (XLA, cache
# misses) and reading compiled programs back from the persistent cache, appended to FILE as
# JSON lines (one file per xdist worker: FILE.<worker>). Where the suite's time goes.
if os.environ.get("DIFFAX_COMPILE_REPORT"):
    import json as _json

    from jax import monitoring as _monitoring

    _compile_seconds: dict = {}

    def _listener(event, duration, **kwargs):
        if event in (
            "/jax/core/compile/backend_compile_duration",
            "/jax/compilation_cache/cache_retrieval_time_sec",
            "/jax/core/compile/jaxpr_trace_duration",
        ):
            _compile_seconds[event] = _compile_seconds.get(event, 0.0) + duration

    _monitoring.register_event_duration_secs_listener(_listener)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        _compile_seconds.clear()
        yield
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        with open(f"{os.environ['DIFFAX_COMPILE_REPORT']}.{worker}", "a") as f:
            f.write(_json.dumps({"test": item.nodeid, **_compile_seconds}) + "\n")
