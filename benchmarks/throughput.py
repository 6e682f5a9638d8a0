"""Throughput of any config: training, the network's forward pass, and a whole sampling loop.

    python -m benchmarks.throughput --config=configs/ddpm.py:cpu [--config.x.y=...] \
        [--forward_batch=256] [--sample_steps=50] [--iters=10] [--peak_tflops=0] [--out=FILE]

Prints one JSON object: compile times (reported apart), steady-state train and forward
images/s, DDIM loop images/s per step, analytic GFLOP per image (benchmarks/flops.py),
achieved TFLOP/s, model FLOP utilisation when --peak_tflops is given, and peak device
memory where the backend reports it. Random data of the config's shape: this measures the
step, not the input pipeline (which is on the device and inside the step anyway).
"""

from __future__ import annotations

import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks.common_flags import (
    configure_runtime,
    define_measurement_flags,
    define_runtime_flag,
    print_json,
)
from benchmarks.cpu_profile import timed
from benchmarks.flops import count_flops
from diffax_lab import compilation, sharding
from diffax_lab.diffusion import samplers
from diffax_lab.tasks import registry

FLAGS = flags.FLAGS


def define_flags():
    """Defines this script's flags; called only when it runs as a script, so that
    importing it (tests, notebooks, other benchmarks) defines no global flags."""
    define_measurement_flags()
    define_runtime_flag()
    flags.DEFINE_integer("sample_steps", 50, "DDIM steps of the sampling-loop measurement.")
    flags.DEFINE_float("peak_tflops", 0.0, "Device peak TFLOP/s for MFU (0 = not reported).")
    flags.DEFINE_string("out", "", "Also write the JSON here.")


def peak_memory_gib():
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def measure(
    config, *, forward_batch: int, iters: int, sample_steps: int = 50, peak_tflops: float = 0.0
) -> dict:
    """Compile times, train / forward / sampling-loop throughput and FLOPs of ``config``
    (the JSON record documented at the top); ``sample_steps=0`` leaves the loop out."""
    registry.check_config(config)
    mesh = sharding.make_mesh(config.train.num_devices or None)
    exp = registry.build(config, mesh)
    B, Bf = config.train.batch_size, forward_batch
    shape = exp.image_shape
    result = {
        "config": config.to_dict(),
        "device": str(jax.devices()[0].device_kind),
        "num_devices": mesh.devices.size,
        "jax": jax.__version__,
        "host": platform.node(),
        "params_millions": exp.count_params() / 1e6,
    }

    # FLOPs: one image forward, and one train step per image (forward + backward).
    p = exp.abstract_state["params"]
    x1, t1 = jnp.zeros((1, *shape)), jnp.zeros((1,))
    y1 = jnp.zeros((1,), jnp.int32) if config.model.num_classes else None
    fwd_flops = count_flops(lambda p, x, t: exp.model.apply({"params": p}, x, t, y=y1), p, x1, t1)
    result["gflop_per_image_forward"] = fwd_flops / 1e9

    state = exp.create_state()
    n = max(B, 1024)
    images = jax.device_put(
        np.random.default_rng(0).integers(0, 256, (n, *shape), np.uint8), exp.repl
    )
    labels = jax.device_put(np.zeros((n,), np.int32), exp.repl)
    t0 = time.perf_counter()
    step = compilation.compile_with_options(
        exp.make_train_step(n, True).lower(state, images, labels), training=True
    )
    result["train_compile_s"] = time.perf_counter() - t0
    train_flops = count_flops(
        lambda p, x, t: jax.grad(lambda p: exp.model.apply({"params": p}, x, t, y=y1).sum())(p),
        p,
        x1,
        t1,
    )
    result["gflop_per_image_train"] = train_flops / 1e9

    def run_train(state):
        for _ in range(iters):
            state, metrics = step(state, images, labels)
        return state, metrics

    state, m = step(state, images, labels)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    state, m = run_train(state)
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t0) / iters
    result["train_batch"] = B
    result["train_images_per_s"] = B / dt
    result["train_tflops"] = B * train_flops / dt / 1e12

    params = state["ema_params"]
    yf = jnp.zeros((Bf,), jnp.int32) if config.model.num_classes else None
    fwd = jax.jit(lambda p, x, t: exp.model.apply({"params": p}, x, t, y=yf))
    xf, tf = jnp.zeros((Bf, *shape)), jnp.full((Bf,), 0.5)
    t0 = time.perf_counter()
    fwd = compilation.compile_with_options(fwd.lower(params, xf, tf))
    result["forward_compile_s"] = time.perf_counter() - t0
    dt = timed(lambda: fwd(params, xf, tf), iters)
    result["forward_batch"] = Bf
    result["forward_images_per_s"] = Bf / dt
    result["forward_tflops"] = Bf * fwd_flops / dt / 1e12

    S = sample_steps
    if S:
        loop = jax.jit(
            lambda p, k: (
                samplers.sample(
                    exp.model_fn(p, yf),
                    exp.schedule,
                    (Bf, *shape),
                    k,
                    sampler="ddim",
                    num_steps=S,
                    prediction=config.diffusion.prediction,
                ).samples
            )
        )
        key = jax.random.PRNGKey(0)
        t0 = time.perf_counter()
        loop = compilation.compile_with_options(loop.lower(params, key))
        result["sampler_compile_s"] = time.perf_counter() - t0
        dt = timed(lambda: loop(params, key), max(1, iters // 5))
        result["sampler_steps"] = S
        result["sampler_images_steps_per_s"] = Bf * S / dt  # comparable to forward images/s
    if peak_tflops:
        result["peak_tflops"] = peak_tflops
        result["train_mfu"] = result["train_tflops"] / peak_tflops
        result["forward_mfu"] = result["forward_tflops"] / peak_tflops
    result["peak_memory_gib"] = peak_memory_gib()
    return result


def main(argv):
    del argv
    runtime = configure_runtime()
    result = measure(
        FLAGS.config,
        forward_batch=FLAGS.forward_batch,
        iters=FLAGS.iters,
        sample_steps=FLAGS.sample_steps,
        peak_tflops=FLAGS.peak_tflops,
    )
    result["cpu_runtime"] = runtime
    print_json(result, FLAGS.out, indent=2)


if __name__ == "__main__":
    define_flags()
    app.run(main)
