"""Time DDIM sampling with the 35.7M-parameter U-Net of google/ddpm-cifar10-32 (random
weights in its exact layout: nothing is downloaded), at 10/20/50/100 steps.

    python -m benchmarks.ddim_cifar10 [--batch=500] [--steps=10,20,50,100] [--repeats=2]
    python -m benchmarks.ddim_cifar10 --quick      # a CPU smoke run at tiny sizes

Prints one JSON line per step count: compile seconds (apart), steady-state seconds per
batch, images/s, the analytic GFLOP per network call (benchmarks/flops.py) and achieved
TFLOP/s, and the implied time for 50,000 images (the DDIM paper's FID sample count). The
network is the lab's U-Net built from ddpm-cifar10-32's config.json through the same
mapping ``python -m diffax_lab.convert`` uses, so the timing is that of the converted model.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp

from benchmarks.flops import count_flops
from diffax_lab.diffusion import get_schedule, samplers
from diffax_lab.models.diffusers_config import unet_config_to_lab
from diffax_lab.models.unet import UNet

# google/ddpm-cifar10-32's unet/config.json (Hugging Face hub), the fields that shape it.
DDPM_CIFAR10_32 = {
    "_class_name": "UNet2DModel",
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
T = 1000
FID_SAMPLES = 50_000


def build(quick: bool) -> tuple[UNet, int]:
    config = dict(DDPM_CIFAR10_32)
    size = 32
    if quick:  # same block layout, 16x narrower and at 16 px
        config.update(block_out_channels=[8, 16, 16, 16], norm_num_groups=8, sample_size=16)
        size = 16
    return UNet(**unet_config_to_lab(config, T)), size


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ddim_cifar10")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--steps", default="10,20,50,100")
    parser.add_argument("--repeats", type=int, default=2, help="timed batches per setting")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a CPU check")
    args = parser.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",") if s]
    batch = args.batch
    if args.quick:
        batch, steps, args.repeats = min(batch, 2), [2, 3], 1
    model, size = build(args.quick)
    shape = (batch, size, size, 3)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), jnp.ones(1))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    gflop_call = count_flops(model.apply, params, jnp.zeros((1, size, size, 3)), jnp.ones(1)) / 1e9
    schedule = get_schedule("linear", T)

    def fn(x, t):
        return model.apply(params, x, t)

    rows = []
    for n in steps:
        run = jax.jit(
            lambda key, n=n: (
                samplers.sample(
                    fn, schedule, shape, key, sampler="ddim", num_steps=n, eta=0.0
                ).samples
            )
        )
        t0 = time.perf_counter()
        run(jax.random.PRNGKey(0)).block_until_ready()
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for r in range(args.repeats):
            run(jax.random.PRNGKey(r + 1)).block_until_ready()
        per_batch = (time.perf_counter() - t0) / args.repeats
        ips = batch / per_batch
        row = {
            "sampler": "ddim",
            "steps": n,
            "batch": batch,
            "image": f"{size}x{size}x3",
            "params_M": round(n_params / 1e6, 2),
            "compile_s": round(compile_s, 2),
            "s_per_batch": round(per_batch, 4),
            "images_per_s": round(ips, 2),
            "gflop_per_call": round(gflop_call, 3),
            "achieved_tflops": round(gflop_call * n * ips / 1e3, 2),
            f"minutes_for_{FID_SAMPLES}": round(FID_SAMPLES / ips / 60, 2),
            "device": jax.devices()[0].device_kind,
            "jax": jax.__version__,
            "host": platform.node(),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
