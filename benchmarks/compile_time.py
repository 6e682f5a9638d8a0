"""Cold compile time of the tiny U-Net's train step, then the same step compiled again in
the same process (read back from the persistent cache), under the XLA_FLAGS of the
environment:

    XLA_FLAGS="--xla_backend_optimization_level=0" python -m benchmarks.compile_time \
        [CACHE_DIR] [--config=ddpm.py:tiny] [--layout=auto|flat|tree]

The step is the config's (default ``configs/ddpm.py:tiny``, the program the tests' shared
tiny run compiles), its batch drawn from max(64, train.batch_size) uint8 images held on
the device. CACHE_DIR (default: a new temporary directory, so the
first compile is cold) is the persistent cache. Prints one line per compile: the seconds to
trace and lower, and to compile. docs/BENCHMARKS.md ("Compile time and the persistent
cache") has the figures of several flag settings.
"""

import os
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from diffax_lab import compilation, config_lib  # noqa: E402
from diffax_lab.optimizer import LAYOUTS  # noqa: E402
from diffax_lab.sharding import make_mesh  # noqa: E402
from diffax_lab.tasks import registry  # noqa: E402


def main(cache_dir: str, config_name: str = "ddpm.py:tiny", layout: str = "auto") -> None:
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    config = config_lib.load_config(config_name)
    config.optim.update_layout = layout  # diffax_lab/optimizer.py
    n = max(64, config.train.batch_size)
    print(f"{config_name} XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} cache={cache_dir}")
    for attempt in ("cold", "again, same process"):
        task = registry.build(config, make_mesh(1))  # a new task: a new jitted step
        state = task.create_state()
        images = jax.device_put(np.zeros((n, *task.image_shape), np.uint8))
        labels = jax.device_put(np.zeros((n,), np.int32))
        t0 = time.perf_counter()
        lowered = task.make_train_step(n, True).lower(state, images, labels)
        t1 = time.perf_counter()
        compilation.compile_with_options(lowered, training=True)
        t2 = time.perf_counter()
        print(
            f"{attempt} ({task.update_layout} update): trace and lower {t1 - t0:.2f} s, "
            f"compile {t2 - t1:.2f} s",
            flush=True,
        )


flags.DEFINE_string("config", "ddpm.py:tiny", "Config whose train step compiles (with :variant).")
flags.DEFINE_enum("layout", "auto", LAYOUTS, "optim.update_layout of the step.")


def run(argv) -> None:
    if len(argv) > 2:
        raise app.UsageError(f"One positional argument (CACHE_DIR) at most, not {argv[1:]}.")
    cache = argv[1] if len(argv) > 1 else tempfile.mkdtemp(prefix="compile_time_")
    main(cache, flags.FLAGS.config, flags.FLAGS.layout)


if __name__ == "__main__":
    app.run(run)
