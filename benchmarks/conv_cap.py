"""How fast could this network be on this backend? Its convolutions alone, ours beside PyTorch.

    python -m benchmarks.conv_cap --config=configs/ddpm.py:cpu [--forward_batch=64] \
        [--iters=10] [--rounds=3] [--threads=2] [--pieces] [--out=FILE]

Every ``conv_general_dilated`` of the network's forward pass (its shapes, strides,
padding, groups) is read from the jaxpr at the forward batch and at the config's train
batch (1x1 convolutions that ``layers.Conv`` runs as dots on this backend are dots, not
convolutions, and are left out on both sides). Ours: one compiled program running all of them, each on its own input (no
dispatch between them, nothing shared for XLA to fold): the forward convolutions, and for
training the forward plus both gradients (input and kernel) of each. PyTorch: the same
convolutions through ``torch.nn.functional.conv2d`` (channels-last, as the peer runs
them), forward and forward + backward. Beside them, the PyTorch peer's whole network
(benchmarks/diffusers_peer.py's ``UNet2DModel``; train = ``cpu_profile.Peer``'s full step:
the batch, noising, forward, backward, clip, AdamW and EMA, the lab's step's work).

``cap = PyTorch whole network / our convolutions alone`` is the ratio of images/s that
ours could reach if everything but XLA's convolutions took no time at all: below 1.0,
no change outside the convolution implementation reaches PyTorch eager. Rounds alternate
ours and PyTorch, so that a shared machine's load falls on both alike.

``--pieces``: each distinct convolution of the train batch timed alone, in its three parts
(forward, input gradient, kernel gradient), ours beside PyTorch's ``conv2d``,
``torch.nn.grad.conv2d_input`` and ``conv2d_weight``; totals weighted by how often each
occurs in the network. It says which part of XLA:CPU's convolution falls behind.
"""

from __future__ import annotations

import json
import os

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
from benchmarks.flops import sub_jaxprs
from diffax_lab import compilation

FLAGS = flags.FLAGS


def define_flags():
    define_measurement_flags()
    define_runtime_flag()
    flags.DEFINE_integer("rounds", 3, "Alternating rounds of ours and PyTorch.")
    flags.DEFINE_integer("threads", 2, "torch.set_num_threads (0 = torch's default).")
    flags.DEFINE_bool("pieces", False, "Also time forward / input grad / kernel grad apart.")
    flags.DEFINE_string("out", "", "Also write the JSON here.")


def network_convs(model, params, x, t) -> list[dict]:
    """The convolutions of ``model.apply(params, x, t)``, in order: input and kernel shapes
    and the lax parameters, read from the jaxpr (sub-jaxprs included)."""
    jaxpr = jax.make_jaxpr(lambda p, x, t: model.apply({"params": p}, x, t))(params, x, t)
    found = []

    def visit(jx):
        for eqn in jx.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                p = eqn.params
                found.append(
                    dict(
                        lhs=tuple(eqn.invars[0].aval.shape),
                        rhs=tuple(eqn.invars[1].aval.shape),
                        window_strides=tuple(p["window_strides"]),
                        padding=tuple(tuple(q) for q in p["padding"]),
                        lhs_dilation=tuple(p["lhs_dilation"]),
                        rhs_dilation=tuple(p["rhs_dilation"]),
                        dimension_numbers=p["dimension_numbers"],
                        feature_group_count=p["feature_group_count"],
                    )
                )
            for _, sub in sub_jaxprs(eqn):
                visit(sub)

    visit(jaxpr.jaxpr)
    return found


def config_convs(config, batches: dict) -> dict:
    """{key: network_convs of the config's network at batch size ``batches[key]``}, on
    its initial parameters (the config checked first)."""
    from diffax_lab import sharding
    from diffax_lab.tasks import registry

    registry.check_config(config)
    exp = registry.build(config, sharding.make_mesh(config.train.num_devices or None))
    params = exp.create_state()["params"]
    x = {k: jnp.zeros((b, *exp.image_shape)) for k, b in batches.items()}
    return {
        k: network_convs(exp.model, params, x[k], jnp.full((b,), 0.5)) for k, b in batches.items()
    }


def _lax_conv(spec):
    def conv(x, k):
        return jax.lax.conv_general_dilated(
            x,
            k,
            spec["window_strides"],
            spec["padding"],
            lhs_dilation=spec["lhs_dilation"],
            rhs_dilation=spec["rhs_dilation"],
            dimension_numbers=spec["dimension_numbers"],
            feature_group_count=spec["feature_group_count"],
        )

    return conv


def _random_args(spec, train: bool, rng):
    x = jnp.asarray(rng.normal(size=spec["lhs"]), jnp.float32)
    k = jnp.asarray(rng.normal(size=spec["rhs"]) * 0.1, jnp.float32)
    out_shape = jax.eval_shape(_lax_conv(spec), x, k).shape
    g = jnp.asarray(rng.normal(size=out_shape), jnp.float32) if train else None
    return x, k, g


def _first_elements(outputs):
    """The sum of the first element of each array in ``outputs``: a scalar that depends on
    all of them. Adding 0 times it to the next convolution's kernel makes that convolution
    wait for these outputs. An optimization barrier would not: XLA:CPU expands barriers
    away before it schedules (OptimizationBarrierExpander), and then ran the forward
    program's independent convolutions two at a time. XLA does not fold a float multiply
    by zero (NaN * 0 is NaN), and the kernel is small, so the dependency costs next to
    nothing."""
    return sum(a.reshape(-1)[0] for a in jax.tree.leaves(outputs))


def ours_program(specs, train: bool):
    """(compiled fn, its arguments): every conv of ``specs`` on its own inputs, in one program,
    each with its bias added (as the network's convolutions and PyTorch's ``conv2d`` here
    have: in an inference program XLA:CPU then hands the convolution and its bias to
    YNNPACK together, as it does in the network's forward pass); with ``train``, each
    conv's forward and its vjp (input and kernel gradients). Arguments: (x, kernel, bias,
    output cotangent or None) per convolution."""
    rng = np.random.default_rng(0)
    args = []
    for s in specs:
        x, k, g = _random_args(s, train, rng)
        bias = jnp.asarray(rng.normal(size=k.shape[-1]) * 0.1, jnp.float32)
        args.append((x, k, bias, g))

    def run(args):
        outs, prev = [], None
        for s, (x, k, bias, g) in zip(specs, args, strict=True):
            if prev is not None:  # one after the other, as in the network (not 2 at a time)
                k = k + 0.0 * _first_elements(prev)
            conv = _lax_conv(s)

            def conv_bias(x, k, conv=conv, bias=bias):
                return conv(x, k) + bias

            if train:
                y, vjp = jax.vjp(conv_bias, x, k)
                outs.append((y, *vjp(g)))
            else:
                outs.append(conv_bias(x, k))
            prev = outs[-1]
        return outs

    compiled = compilation.compile_with_options(jax.jit(run).lower(args), training=train)
    return compiled, args


def torch_program(torch, specs, train: bool):
    """The same convolutions in PyTorch eager (NCHW shapes, channels-last memory)."""
    F = torch.nn.functional
    items = []
    for s in specs:
        lhs, rhs, out = s["dimension_numbers"]  # ConvDimensionNumbers of dimension indices
        if s["lhs_dilation"] != (1, 1) or s["feature_group_count"] != 1:
            raise ValueError(f"conv_cap: no PyTorch twin for {s}")
        n, c, h, w = (s["lhs"][i] for i in lhs)
        o, i_, kh, kw = (s["rhs"][i] for i in rhs)
        x = torch.randn(n, c, h, w).to(memory_format=torch.channels_last)
        k = (torch.randn(o, i_, kh, kw) * 0.1).to(memory_format=torch.channels_last)
        b = torch.zeros(o)
        (pt, pb), (pl, pr) = s["padding"]
        pad = (pl, pr, pt, pb)
        if train:
            x.requires_grad_(True)
            k.requires_grad_(True)
        items.append((x, k, b, pad, s["window_strides"], s["rhs_dilation"]))

    def run():
        for x, k, b, pad, stride, dil in items:
            xin = F.pad(x, pad) if any(pad) else x
            if train:
                y = F.conv2d(xin, k, b, stride=stride, dilation=dil)
                y.backward(torch.ones_like(y))
            else:
                with torch.no_grad():
                    F.conv2d(xin, k, b, stride=stride, dilation=dil)

    return run


PIECES = ("fwd", "dx", "dw")


def piece_programs(torch, spec) -> dict:
    """{"ours_fwd" | "ours_dx" | "ours_dw" | "torch_...": a no-argument callable}: one
    convolution's forward, input gradient and kernel gradient, each alone, both sides on
    the same numbers (PyTorch's input is ours, padded; its input gradient is therefore that
    of the padded input)."""
    F, grad = torch.nn.functional, torch.nn.grad
    conv = _lax_conv(spec)
    x, k, g = _random_args(spec, True, np.random.default_rng(0))
    parts = {
        "fwd": lambda x, k, g: conv(x, k),
        "dx": lambda x, k, g: jax.vjp(lambda x: conv(x, k), x)[1](g)[0],
        "dw": lambda x, k, g: jax.vjp(lambda k: conv(x, k), k)[1](g)[0],
    }
    out = {}
    for name, fn in parts.items():
        c = compilation.compile_with_options(jax.jit(fn).lower(x, k, g), training=True)
        out[f"ours_{name}"] = lambda c=c: c(x, k, g)
    lhs, rhs, outs = spec["dimension_numbers"]
    (pt, pb), (pl, pr) = spec["padding"]
    cl = torch.channels_last

    def to_torch(a, dims):  # our layout -> PyTorch's NCHW / OIHW, channels-last memory
        return torch.from_numpy(np.asarray(a).transpose(dims).copy()).contiguous(memory_format=cl)

    tx = F.pad(to_torch(x, lhs), (pl, pr, pt, pb)).contiguous(memory_format=cl)
    tk, tg = to_torch(k, rhs), to_torch(g, outs)
    st, dil = spec["window_strides"], spec["rhs_dilation"]
    # No tensor here requires grad: nothing is recorded for autograd.
    out["torch_fwd"] = lambda: F.conv2d(tx, tk, stride=st, dilation=dil)
    out["torch_dx"] = lambda: grad.conv2d_input(tx.shape, tk, tg, stride=st, dilation=dil)
    out["torch_dw"] = lambda: grad.conv2d_weight(tx, tk.shape, tg, stride=st, dilation=dil)
    return out


def pieces(torch, specs, rounds: int, iters: int) -> dict:
    """Per distinct convolution and weighted totals, ms (median over alternating rounds)."""
    from benchmarks.cpu_profile import timed

    distinct = {}
    for s in specs:
        key = json.dumps(s, default=str, sort_keys=True)
        distinct.setdefault(key, [s, 0])[1] += 1
    table = []
    for spec, count in distinct.values():
        progs = piece_programs(torch, spec)
        times = {name: [] for name in progs}
        for _ in range(rounds):
            for name, fn in progs.items():
                times[name].append(timed(fn, iters) * 1e3)
        row = {"lhs": spec["lhs"], "rhs": spec["rhs"], "count": count}
        row.update({name: float(np.median(v)) for name, v in times.items()})
        table.append(row)
    totals = {
        f"{who}_{p}_ms": sum(r["count"] * r[f"{who}_{p}"] for r in table)
        for who in ("ours", "torch")
        for p in PIECES
    }
    return {"convolutions": table, "totals": totals}


def main(argv):
    del argv
    runtime = configure_runtime()
    import torch

    from benchmarks.cpu_profile import Peer, timed

    if FLAGS.threads:
        torch.set_num_threads(FLAGS.threads)
    config = FLAGS.config
    batches = {"train": config.train.batch_size, "forward": FLAGS.forward_batch}
    specs = config_convs(config, batches)
    ours = {k: ours_program(specs[k], k == "train") for k in specs}
    theirs = {k: torch_program(torch, specs[k], k == "train") for k in specs}
    peer = Peer(config, FLAGS.forward_batch)
    whole = {"train": peer.train, "forward": peer.forward}
    rounds = []
    for _ in range(FLAGS.rounds):
        r = {}
        for k in ("train", "forward"):
            fn, args = ours[k]
            r[f"ours_convs_{k}_ms"] = timed(lambda f=fn, a=args: f(a), FLAGS.iters) * 1e3
            r[f"torch_convs_{k}_ms"] = timed(theirs[k], FLAGS.iters) * 1e3
            r[f"torch_network_{k}_ms"] = timed(whole[k], FLAGS.iters) * 1e3
            r[f"cap_{k}"] = r[f"torch_network_{k}_ms"] / r[f"ours_convs_{k}_ms"]
        rounds.append(r)
        print(json.dumps(r), flush=True)
    result = {
        "train_batch": batches["train"],
        "forward_batch": batches["forward"],
        "convolutions": len(specs["forward"]),
        "jax": jax.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "cpu_runtime": runtime,
        "rounds": rounds,
    }
    for key in rounds[0]:
        result[f"median_{key}"] = float(np.median([r[key] for r in rounds]))
    if FLAGS.pieces:
        result["pieces"] = pieces(torch, specs["train"], FLAGS.rounds, FLAGS.iters)
    print_json(result, FLAGS.out)


if __name__ == "__main__":
    define_flags()
    app.run(main)
