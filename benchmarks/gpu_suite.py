"""The one-command GPU suite: every speed figure of the CIFAR-10 U-Net, ours beside PyTorch's.

    bash benchmarks/gpu_suite.sh [OUT_DIR]          # default ./gpu_suite_out, ~5 min on one GPU
    python -m benchmarks.gpu_suite --out=DIR [--quick] [--peer_modes=fp32,bf16]

Measures, for the 35.7M-parameter U-Net of configs/cifar10_ddpm.py (``--quick``: the tiny
config of configs/ddpm.py at small batches, a CPU check of the script itself):
  * ours in float32 and in bfloat16 (``model.dtype``): train images/s at batch 128 (one
    whole jitted step: loss, gradients, AdamW, EMA), forward images/s at batch 256, cold
    compile time of each (no persistent cache), peak device memory (``memory_stats``), and
    MFU from the analytic FLOP count (benchmarks/flops.py) against the device's peak;
  * the PyTorch peer (benchmarks/diffusers_peer.py: diffusers' UNet2DModel of the same
    network) in eager fp32 (TF32 allowed) and bf16 autocast, skipped with the reason printed
    when torch or diffusers cannot be imported.
Each part runs in its own process (clean peak-memory counters, no JAX preallocation in the
way of PyTorch, a time limit per part); a failed part is recorded with its error and the
suite goes on. Writes DIR/suite.json (all records) and DIR/suite.md (the table).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

# Dense peak TFLOP/s by device kind (vendor datasheets, SXM parts): (bf16, tf32). JAX and
# PyTorch here both run float32 matmuls and convolutions in TF32 on these GPUs.
PEAKS = {
    "H200": (989.0, 494.0),
    "H100": (989.0, 494.0),
    "A100": (312.0, 156.0),
    "L4": (121.0, 60.0),
    "A10": (125.0, 62.5),
}

FULL = dict(
    config="configs/cifar10_ddpm.py", train_batch=128, forward_batch=256, iters=20, timeout=240
)
QUICK = dict(config="configs/ddpm.py:tiny", train_batch=8, forward_batch=16, iters=2, timeout=900)


def peak_tflops(device_kind: str, dtype: str) -> float:
    for name, (bf16, tf32) in PEAKS.items():
        if name.lower() in device_kind.lower():
            return bf16 if dtype == "bfloat16" else tf32
    return 0.0


def part_ours(args, sizes) -> dict:
    import jax

    from benchmarks.throughput import measure
    from diffax_lab import config_lib

    config = config_lib.load_config(sizes["config"])
    config.model.dtype = args.dtype
    config.train.batch_size = sizes["train_batch"]
    kind = str(jax.devices()[0].device_kind)
    result = measure(
        config,
        forward_batch=sizes["forward_batch"],
        iters=sizes["iters"],
        sample_steps=0,
        peak_tflops=args.peak_tflops or peak_tflops(kind, args.dtype),
    )
    del result["config"]
    result.update(impl="diffax_lab (JAX)", dtype=args.dtype, backend=jax.default_backend())
    return result


def part_peer(args, sizes) -> list[dict]:
    try:
        import torch
        from diffusers import UNet2DModel
    except Exception as e:  # ImportError, or a broken dependency of diffusers
        reason = f"PyTorch peer skipped: cannot import torch/diffusers ({type(e).__name__}: {e})"
        print(reason, flush=True)
        return [{"impl": "diffusers (PyTorch)", "skipped": reason}]
    from benchmarks.diffusers_peer import run_mode, setup_torch, unet_kwargs
    from diffax_lab import config_lib

    config = config_lib.load_config(sizes["config"])
    dev = setup_torch(torch)
    kwargs = unet_kwargs(config.model, config.data.image_size, config.data.channels)
    out = []
    for mode in args.peer_modes.split(","):
        r = run_mode(
            mode,
            torch,
            UNet2DModel,
            dev,
            kwargs,
            config,
            train_batch=sizes["train_batch"],
            forward_batch=sizes["forward_batch"],
            iters=sizes["iters"],
        )
        r.update(impl="diffusers (PyTorch)", dtype=mode)
        out.append(r)
        print(json.dumps(r), flush=True)
    return out


def run_part(name: str, extra: list[str], args, timeout: float) -> list[dict]:
    """Runs one part in a child process; its records, or one record of the failure."""
    path = os.path.join(args.out, f"{name}.json")
    cmd = [sys.executable, "-m", "benchmarks.gpu_suite", "--part", name.split("_")[0]]
    cmd += ["--out", args.out, "--record", path] + extra
    if args.quick:
        cmd.append("--quick")
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONUNBUFFERED="1")
    print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True)
        log = proc.stdout + proc.stderr
        ok = proc.returncode == 0 and os.path.exists(path)
        error = None if ok else f"exit {proc.returncode}: {log.strip()[-1500:]}"
    except subprocess.TimeoutExpired as e:
        log = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        error = f"timed out after {timeout:.0f} s"
    with open(os.path.join(args.out, f"{name}.log"), "w") as f:
        f.write(log)
    print(f"   {name}: {'ok' if not error else error[:300]} ({time.perf_counter() - t0:.0f} s)")
    if error:
        return [{"impl": name, "error": error}]
    with open(path) as f:
        return json.load(f)


def fmt(v, spec="{:,.0f}"):
    return "-" if v is None else spec.format(v)


def markdown(records: list[dict], meta: dict) -> str:
    lines = [
        f"# GPU suite: {meta['config']} on {meta['device']}",
        "",
        f"{meta['date']}; jax {meta.get('jax', '?')}, torch {meta.get('torch', '-')}; "
        f"train batch {meta['train_batch']}, forward batch {meta['forward_batch']}, "
        f"{meta['iters']} timed iterations after warm-up; suite wall time {meta['wall_s']:.0f} s.",
        "",
        "| implementation | dtype | train img/s | forward img/s | train compile s "
        "| forward compile s | peak mem GiB | train MFU | forward MFU |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        if "error" in r or "skipped" in r:
            why = r.get("error") or r.get("skipped")
            lines.append(f"| {r['impl']} | - | {why.splitlines()[-1][:200]} |||||||")
            continue
        compile_ = r.get("compile") or {}
        lines.append(
            "| {impl} | {dtype} | {tr} | {fw} | {tc} | {fc} | {mem} | {tm} | {fm} |".format(
                impl=r["impl"],
                dtype=r["dtype"],
                tr=fmt(r.get("train_images_per_s")),
                fw=fmt(r.get("forward_images_per_s")),
                tc=fmt(r.get("train_compile_s", compile_.get("train_first_call_s")), "{:.1f}"),
                fc=fmt(r.get("forward_compile_s", compile_.get("forward_first_call_s")), "{:.1f}"),
                mem=fmt(r.get("peak_memory_gib"), "{:.2f}"),
                tm=fmt(r.get("train_mfu"), "{:.1%}"),
                fm=fmt(r.get("forward_mfu"), "{:.1%}"),
            )
        )
    ours = {r["dtype"]: r for r in records if r.get("impl", "").startswith("diffax")}
    peer = {r["dtype"]: r for r in records if r.get("impl", "").startswith("diffusers")}
    pairs = [("float32", "fp32"), ("bfloat16", "bf16")]
    ratio = [
        f"{a}: train {ours[a]['train_images_per_s'] / peer[b]['train_images_per_s']:.2f}x, "
        f"forward {ours[a]['forward_images_per_s'] / peer[b]['forward_images_per_s']:.2f}x"
        for a, b in pairs
        if "train_images_per_s" in ours.get(a, {}) and "train_images_per_s" in peer.get(b, {})
    ]
    if ratio:
        lines += ["", "Ours / PyTorch eager: " + "; ".join(ratio) + "."]
    gf = next((r for r in records if "gflop_per_image_train" in r), None)
    if gf:
        lines += [
            "",
            f"Analytic FLOPs per image: {gf['gflop_per_image_forward']:.2f} GFLOP forward, "
            f"{gf['gflop_per_image_train']:.2f} GFLOP forward+backward; MFU against "
            f"{', '.join(f'{k} {v}' for k, v in PEAKS.items())} dense TFLOP/s (bf16, tf32).",
        ]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="gpu_suite_out")
    ap.add_argument("--quick", action="store_true", help="Tiny sizes: a CPU check of the suite.")
    ap.add_argument("--part", default="all", choices=["all", "ours", "peer"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--peer_modes", default="fp32,bf16", help="fp32,bf16[,bf16_compile]")
    ap.add_argument("--peak_tflops", type=float, default=0.0, help="0 = from the device kind.")
    ap.add_argument(
        "--budget_s",
        type=float,
        default=450.0,
        help="Whole-suite time limit: each part gets what is left, less 60 s a later part.",
    )
    ap.add_argument("--record", default="", help="(internal) where a part writes its records.")
    args = ap.parse_args()
    sizes = QUICK if args.quick else FULL
    os.makedirs(args.out, exist_ok=True)
    if args.part != "all":
        records = part_ours(args, sizes) if args.part == "ours" else part_peer(args, sizes)
        with open(args.record, "w") as f:
            json.dump(records if isinstance(records, list) else [records], f, indent=2)
        return

    t0 = time.perf_counter()
    budget = args.budget_s if not args.quick else float("inf")

    def limit(parts_after):  # the part's own limit, within what the budget leaves
        left = budget - (time.perf_counter() - t0) - 60.0 * parts_after
        return max(30.0, min(sizes["timeout"], left))

    records = []
    for i, dtype in enumerate(("float32", "bfloat16")):
        records += run_part(f"ours_{dtype}", ["--dtype", dtype], args, limit(2 - i))
    records += run_part("peer", ["--peer_modes", args.peer_modes], args, limit(0))
    first = next((r for r in records if "device" in r), {})
    meta = {
        "config": sizes["config"],
        "device": first.get("device", "?"),
        "host": platform.node(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "jax": next((r["jax"] for r in records if "jax" in r), None),
        "torch": next((r["torch"] for r in records if "torch" in r), None),
        "train_batch": sizes["train_batch"],
        "forward_batch": sizes["forward_batch"],
        "iters": sizes["iters"],
        "wall_s": time.perf_counter() - t0,
    }
    with open(os.path.join(args.out, "suite.json"), "w") as f:
        json.dump({"meta": meta, "records": records}, f, indent=2)
    table = markdown(records, meta)
    with open(os.path.join(args.out, "suite.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
