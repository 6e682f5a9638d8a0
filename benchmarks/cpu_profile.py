"""Where a train step and a sampling step spend their time, by op family, ours beside PyTorch.

    python -m benchmarks.cpu_profile --config=configs/ddpm.py:tiny [--forward_batch=256] \
        [--iters=5] [--rounds=2] [--warmup_rounds=1] [--peer] [--peer_step=full] \
        [--noprofile] [--out=FILE]

Ours: the compiled train step (one jitted step: batch gather, noise, U-Net forward and
backward, AdamW, EMA) and the network forward (what one sampling step costs) run under
``jax.profiler.trace``; every executed HLO instruction's time (the CPU runtime's thunk
events) is assigned to a family from the instruction's fused body and its source metadata
(the Flax module path): conv, norm (GroupNorm), attention (everything under an attention
block), matmul (other dots: time embedding), rng (dropout masks, noise, the batch
permutation), optimizer (outside the network: loss, gradient norm, AdamW, EMA), layout
(copies and transposes without a source op), elementwise (the rest of the network:
activations, adds, resizes). "host" is the wall time per step the executor does not cover
(dispatch, Python). Op times on several threads can overlap, so families are given as
shares of the summed op time and as milliseconds scaled to the executor's wall time.

PyTorch (``--peer``, needs torch + diffusers): the same network (benchmarks/diffusers_peer.py)
in a train step that does the lab's step's work (``Peer``; ``--peer_step=network`` leaves
out the batch, the noising and the EMA, as the peer of docs/BENCHMARKS.md's first four
passes did), under ``torch.profiler``, aten ops' self CPU time by family; the optimizer
(clip, AdamW, EMA) timed apart. Both run in this one process, alternately ``--rounds``
times, so that a shared machine's load falls on both alike; images/s of each round are
printed with the ratios. Each round also records the process's minor page faults per
train step, ours and PyTorch's (``ours_train_faults``, ``torch_train_faults``: pages the
kernel had to map).
"""

from __future__ import annotations

import collections
import contextlib
import glob
import gzip
import json
import os
import re
import resource
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks.common_flags import (
    configure_runtime,
    define_measurement_flags,
    define_peer_step_flag,
    define_runtime_flag,
    print_json,
)
from diffax_lab import compilation, sharding
from diffax_lab.tasks import registry

FLAGS = flags.FLAGS
FAMILIES = (
    "conv",
    "norm",
    "attention",
    "matmul",
    "elementwise",
    "layout",
    "rng",
    "optimizer",
    "host",
)


def define_flags():
    define_measurement_flags()
    define_runtime_flag()
    flags.DEFINE_integer("rounds", 2, "Alternating rounds of ours and the peer.")
    flags.DEFINE_integer(
        "warmup_rounds", 1, "Rounds run first, alike, and left out of the medians."
    )
    flags.DEFINE_bool("peer", True, "Also profile the PyTorch peer (torch + diffusers).")
    define_peer_step_flag()
    flags.DEFINE_bool(
        "profile", True, "Profile by op family; --noprofile times the alternating rounds only."
    )
    flags.DEFINE_string("out", "", "Also write the JSON here.")


_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = .*? ([a-z][\w\-]*)\(")
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_OPNAME = re.compile(r'op_name="([^"]*)"')
_COMP = re.compile(r"^(?:ENTRY )?%([\w.\-]+) ")


def _body_lines(text: str):
    """(computation, line) for each line inside a computation of HLO ``text``."""
    current = None
    for line in text.splitlines():
        m = _COMP.match(line)
        if m and line.rstrip().endswith("{"):
            current = m.group(1)
            continue
        yield current, line


def parse_hlo(text: str):
    """{instruction: (opcode, op_name, called computation)}, {computation: set of opcodes}."""
    instrs, comps = {}, collections.defaultdict(set)
    for current, line in _body_lines(text):
        m = _INSTR.match(line)
        if not m:
            continue
        name, opcode = m.groups()
        calls = _CALLS.search(line)
        op = _OPNAME.search(line)
        instrs[name] = (opcode, op.group(1) if op else "", calls.group(1) if calls else "")
        comps[current].add(opcode)
    return instrs, comps


_CONV = re.compile(
    r"= f32\[([\d,]*)\]\S* convolution\(.*?window=\{size=(\d+)x(\d+).*?dim_labels=\w+_\w+->(\w+)"
)
_YNN_CALL = re.compile(r"calls=%([\w.\-]+).*\"kind\":\"__ynn_fusion\"")


def convolution_placement(hlo_text: str) -> dict:
    """Where each convolution of a compiled XLA:CPU program runs: {"xla" | "ynnpack":
    {"kernel_gradient": n, "other": n}}. A convolution runs in YNNPACK when the computation
    holding it is called by a YNNPACK library fusion (``"kind":"__ynn_fusion"``), else as
    XLA's own. A kernel gradient is recognised by its window, wider than its output (XLA
    writes it as the input convolved with the whole output gradient, giving the 3x3
    kernel); forward and input-gradient convolutions have the kernel's window."""
    ynn = set(_YNN_CALL.findall(hlo_text))
    out = {"xla": {"kernel_gradient": 0, "other": 0}, "ynnpack": {"kernel_gradient": 0, "other": 0}}
    for current, line in _body_lines(hlo_text):
        m = _CONV.search(line)
        if not m:
            continue
        dims = [int(d) for d in m.group(1).split(",")]
        window = (int(m.group(2)), int(m.group(3)))
        labels = m.group(4)
        spatial = (dims[labels.index("0")], dims[labels.index("1")])
        kind = "kernel_gradient" if window[0] > spatial[0] or window[1] > spatial[1] else "other"
        out["ynnpack" if current in ynn else "xla"][kind] += 1
    return out


def family(name: str, instrs, comps) -> str:
    opcode, op_name, calls = instrs.get(name, ("", "", ""))
    body = comps.get(calls, set()) | {opcode}
    path = op_name.lower()
    rng_ops = ("_uniform", "_bernoulli", "_normal", "_shuffle", "threefry", "dropout")
    if any(k in path for k in rng_ops):
        return "rng"
    if "convolution" in body:
        return "conv"
    if "attn" in path or "attention" in path:
        return "attention"
    if "dot" in body:
        return "matmul"
    if "norm" in path and "tree_norm" not in path:
        return "norm"
    if not op_name:
        return "layout" if body & {"copy", "transpose", "bitcast", "fusion"} else "elementwise"
    if "unet" not in path:
        return "optimizer"
    return "elementwise"


def trace_events(run, n: int):
    """{event name: total µs} and the executor's total µs over ``n`` calls of ``run``."""
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(n):
                out = run()
            jax.block_until_ready(out)
        (path,) = glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    totals = collections.Counter()
    for e in events:
        if e.get("ph") == "X":
            totals[e["name"]] += e.get("dur", 0.0)
    return totals


def breakdown(compiled, run, n: int, wall_s: float) -> dict:
    instrs, comps = parse_hlo(compiled.as_text())
    totals = trace_events(run, n)
    fam = collections.Counter()
    for name, us in totals.items():
        if name in instrs:
            fam[family(name, instrs, comps)] += us
    op_total = sum(fam.values())
    executor = totals.get("ThunkExecutor::Execute", op_total) / n / 1e3  # ms per call
    wall_ms = wall_s * 1e3
    out = {
        f: {"share": fam[f] / op_total, "ms": fam[f] / op_total * min(executor, wall_ms)}
        for f in FAMILIES
        if f in fam
    }
    out["host"] = {"ms": max(0.0, wall_ms - executor)}
    out["wall_ms_per_call"] = wall_ms
    return out


def timed(fn, iters):
    """Seconds per call of ``fn()`` after one warm-up call, waiting for what it returns
    (JAX arrays in any pytree; PyTorch's CPU tensors are ready when returned)."""
    jax.block_until_ready(fn())
    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / iters


@contextlib.contextmanager
def page_faults(record: dict, key: str, calls: int):
    """Stores in ``record[key]`` the process's minor page faults per call over the block
    (``calls`` calls): pages the kernel had to map, and zero, for the process."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    yield
    record[key] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


class Ours:
    def __init__(self, config, forward_batch):
        registry.check_config(config)
        exp = registry.build(config, sharding.make_mesh(config.train.num_devices or None))
        self.B, self.Bf = config.train.batch_size, forward_batch
        n = max(self.B, 1024)
        shape = exp.image_shape
        rng = np.random.default_rng(0)
        self.images = jax.device_put(rng.integers(0, 256, (n, *shape), np.uint8), exp.repl)
        self.labels = jax.device_put(np.zeros((n,), np.int32), exp.repl)
        self.state = exp.create_state()
        t0 = time.perf_counter()
        self.step = exp.make_train_step(n, True).lower(self.state, self.images, self.labels)
        self.step = compilation.compile_with_options(self.step, training=True)
        self.train_compile_s = time.perf_counter() - t0
        y = jnp.zeros((self.Bf,), jnp.int32) if config.model.num_classes else None
        self.params = self.state["ema_params"]
        self.x, self.t = jnp.zeros((self.Bf, *shape)), jnp.full((self.Bf,), 0.5)
        fwd = jax.jit(lambda p, x, t: exp.model.apply({"params": p}, x, t, y=y))
        self.fwd = compilation.compile_with_options(fwd.lower(self.params, self.x, self.t))
        self.params = jax.tree.map(jnp.copy, self.params)  # the train step donates the state

    def train(self):
        self.state, m = self.step(self.state, self.images, self.labels)
        return m

    def forward(self):
        return self.fwd(self.params, self.x, self.t)


def torch_breakdown(torch, prof_fn, opt_fn, n, wall_s):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            prof_fn()
    fam = collections.Counter()
    for ev in prof.key_averages():
        k = ev.key.lower()
        if not k.startswith("aten::"):
            continue
        if "conv" in k:
            f = "conv"
        elif "group_norm" in k:
            f = "norm"
        elif any(s in k for s in ("bmm", "softmax", "scaled_dot_product", "baddbmm")):
            f = "attention"
        elif any(s in k for s in ("addmm", "aten::mm", "linear", "matmul")):
            f = "matmul"
        elif any(s in k for s in ("copy_", "contiguous", "permute", "transpose", "clone")):
            f = "layout"
        elif any(s in k for s in ("rand", "normal", "bernoulli", "dropout")):
            f = "rng"
        else:
            f = "elementwise"
        fam[f] += ev.self_cpu_time_total
    total = sum(fam.values())
    out = {}
    opt_ms = 0.0
    if opt_fn is not None:
        opt_ms = timed(opt_fn, n) * 1e3
    wall_ms = wall_s * 1e3
    for f in fam:
        out[f] = {"share": fam[f] / total, "ms": fam[f] / total * (wall_ms - opt_ms)}
    if opt_fn is not None:
        out["optimizer"] = {"ms": opt_ms}
    out["wall_ms_per_call"] = wall_ms
    return out


class Peer:
    """The same network in PyTorch eager (diffusers' ``UNet2DModel``, channels-last), its
    train step around the network ``diffusers_peer.TrainWork``'s (``step="full"``: the work
    of the lab's step, batch, noising and EMA included; ``"network"``: the peer of
    docs/BENCHMARKS.md's first four passes)."""

    def __init__(self, config, forward_batch, step: str = "full"):
        import torch
        from diffusers import UNet2DModel

        from benchmarks.diffusers_peer import TrainWork, unet_kwargs

        self.torch = torch
        c = config
        torch.manual_seed(0)
        kwargs = unet_kwargs(c.model, c.data.image_size, c.data.channels)
        self.model = UNet2DModel(**kwargs).to(memory_format=torch.channels_last)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=2e-4, weight_decay=0.0)
        self.B, self.Bf = c.train.batch_size, forward_batch
        self.work = TrainWork(torch, self.model, c, self.B, torch.device("cpu"), step)
        self.fx, self.ft = self.work.noise_batch(self.Bf)

    def fwd_bwd(self):
        x, t, eps = self.work.batch()
        out = self.model(x, t).sample
        loss = self.torch.nn.functional.mse_loss(out, eps)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        return loss

    def opt_step(self):
        self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.work.after_update()

    def train(self):
        self.model.train()
        loss = self.fwd_bwd()
        self.opt_step()
        return loss.detach()

    def forward(self):
        with self.torch.no_grad():
            self.model.eval()
            return self.model(self.fx, self.ft).sample


def main(argv):
    del argv
    runtime = configure_runtime()
    config = FLAGS.config
    iters = FLAGS.iters
    cache = compilation.enable_persistent_cache()  # the default dir; 'off' via the env var
    ours = Ours(config, FLAGS.forward_batch)
    peer = Peer(config, FLAGS.forward_batch, FLAGS.peer_step) if FLAGS.peer else None
    rounds, warmup = [], []
    # Alternate, so that the machine's load hits both alike. The first --warmup_rounds are
    # timed alike but left out of the medians: in them the process's heap is still
    # growing to its working size (page faults on both sides, tens of percent slower).
    for i in range(FLAGS.warmup_rounds + FLAGS.rounds):
        r = {}
        with page_faults(r, "ours_train_faults", iters + 1):
            r["ours_train"] = ours.B / timed(ours.train, iters)
        r["ours_forward"] = ours.Bf / timed(ours.forward, iters)
        if peer:
            with page_faults(r, "torch_train_faults", iters + 1):
                r["torch_train"] = peer.B / timed(peer.train, iters)
            r["torch_forward"] = peer.Bf / timed(peer.forward, iters)
            r["ratio_train"] = r["ours_train"] / r["torch_train"]
            r["ratio_forward"] = r["ours_forward"] / r["torch_forward"]
        (warmup if i < FLAGS.warmup_rounds else rounds).append(r)
        print(json.dumps(r), flush=True)
    result = {
        "config": FLAGS["config"].value if hasattr(FLAGS["config"], "value") else "",
        "train_batch": ours.B,
        "forward_batch": ours.Bf,
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "rounds": rounds,
        "warmup_rounds": warmup,
        "train_compile_s": ours.train_compile_s,
        "compilation_cache": cache,
        "cpu_runtime": runtime,
        "peer_step": FLAGS.peer_step if peer else None,
    }
    if peer:
        for key in ("train", "forward"):
            result[f"median_ratio_{key}"] = float(np.median([r[f"ratio_{key}"] for r in rounds]))
    if FLAGS.profile:
        result["ours_train_profile"] = breakdown(
            ours.step, ours.train, iters, ours.B / rounds[-1]["ours_train"]
        )
        result["ours_forward_profile"] = breakdown(
            ours.fwd, ours.forward, iters, ours.Bf / rounds[-1]["ours_forward"]
        )
    if peer and FLAGS.profile:
        peer.model.train()
        result["torch_threads"] = peer.torch.get_num_threads()
        result["torch_train_profile"] = torch_breakdown(
            peer.torch, peer.fwd_bwd, peer.opt_step, iters, peer.B / rounds[-1]["torch_train"]
        )
        peer.model.eval()
        result["torch_forward_profile"] = torch_breakdown(
            peer.torch, peer.forward, None, iters, peer.Bf / rounds[-1]["torch_forward"]
        )
    result.pop("config")
    print_json(result, FLAGS.out)


if __name__ == "__main__":
    define_flags()
    app.run(main)
