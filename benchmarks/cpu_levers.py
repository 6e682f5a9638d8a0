"""What each CPU lever of the lab is worth: train and forward images/s with one lever off.

    python -m benchmarks.cpu_levers --config=configs/ddpm.py:tiny [--forward_batch=64] \
        [--iters=10] [--rounds=3] [--variants=all,dropout_jax_random] [--peer] \
        [--warmup_rounds=1] [--out=FILE]

Variants, all built in this one process and timed alternately round by round (so that a
shared machine's load falls on all alike):

- ``all``: what the lab runs on the CPU;
- ``no_fusion_options``: XLA's default YNNPACK library fusions
  (``$DIFFAX_CPU_FUSIONS=off``, see ``compilation.cpu_compiler_options``);
- ``no_reduce_fusion``: the lab's fusion option without ``REDUCE`` (reductions as XLA's
  own instead of YNNPACK's);
- ``ynn_convolutions``: the lab's fusion option with ``INDIVIDUAL_CONVOLUTION`` back (each
  convolution one YNNPACK call, as in XLA's default, instead of XLA's own);
- ``ynn_eltwise``: the lab's fusion option with ``ELTWISE`` in the train step too (the
  inference programs' setting: element-wise fusions that take in the forward and input-
  gradient convolutions next to them);
- ``attention_jax_nn``: ``jax.nn.dot_product_attention`` instead of the lab's arrangement
  (``layers.ATTENTION_IMPL_BY_BACKEND``);
- ``norm_autodiff``: GroupNorm's backward by autodiff instead of the hand-written one
  (``layers.NORM_BACKWARD_BY_BACKEND``);
- ``dropout_jax_random``: dropout masks from ``jax.random.bernoulli`` instead of the lab's
  unrolled Threefry (the same masks; ``layers.DROPOUT_IMPL_BY_BACKEND``; only configs with
  model.dropout > 0 differ);
- ``conv_xla``: XLA's convolution for 1x1 convolutions too, instead of a dot
  (``layers.CONV_IMPL_BY_BACKEND``);
- ``conv_onednn_dw``, ``conv_onednn_dw_2t``, ``conv_onednn_all``: oneDNN's kernel gradients
  (on one thread, or on PyTorch's), or all three pieces of each 3x3 convolution
  (PyTorch's threads), inside the step through XLA's FFI (``benchmarks/onednn_ffi.py``;
  needs PyTorch). Not the lab's choices: they ask whether oneDNN's convolutions would
  close the gap to PyTorch from inside our step;
- ``conv_xla_onednn``, ``conv_xla_onednn_all``: XLA:CPU's own oneDNN convolution thunk,
  on XLA's threads, for the forward and input gradient (``_all``: the kernel gradient
  too; ``benchmarks/xla_onednn.py``). Not the lab's choices either: XLA cannot serialize
  such programs, so they turn JAX's persistent compilation cache off for the process;
- ``none``: ``no_fusion_options``, ``attention_jax_nn``, ``norm_autodiff``,
  ``dropout_jax_random`` and ``conv_xla`` together.

``--peer`` times the PyTorch peer (``cpu_profile``'s full step) in each round too and
reports each variant's ratio to it, round by round; ``--warmup_rounds`` are timed first
and left out of the medians (in the first, the process's heap is still growing).

Two diagnostics change the network instead of a lever, to price a part of it in the
whole step (they are not the lab's choices): ``relu_activation`` (``model.activation``
relu instead of SiLU) and ``no_norm`` (``model.norm`` none: no GroupNorm).

The levers are read when a step is traced and compiled, so each variant's steps are
compiled with its setting and then run unchanged. ``--variants`` builds only those named:
fewer compiled steps in memory and more rounds in the same time give a steadier A/B of one
lever (seven variants at once varied by up to 20% between rounds on the 2-core machine).
"""

from __future__ import annotations

import copy
import json
import os

import jax
import numpy as np
from absl import app, flags

from benchmarks.common_flags import (
    check_choices,
    configure_runtime,
    define_measurement_flags,
    define_runtime_flag,
    print_json,
)

FLAGS = flags.FLAGS
VARIANTS = {
    "all": {},
    "no_fusion_options": {"fusions": False},
    "no_reduce_fusion": {"fusion_set": ("DOT", "INDIVIDUAL_DOT")},
    "ynn_convolutions": {
        "fusion_set": ("DOT", "INDIVIDUAL_DOT", "REDUCE", "INDIVIDUAL_CONVOLUTION")
    },
    "ynn_eltwise": {"fusion_set": ("DOT", "INDIVIDUAL_DOT", "REDUCE", "ELTWISE")},
    "attention_jax_nn": {"attention": "xla"},
    "norm_autodiff": {"norm": "autodiff"},
    "dropout_jax_random": {"dropout": "jax"},
    "conv_xla": {"conv": "xla"},
    "conv_onednn_dw": {"conv": "onednn_dw"},
    "conv_onednn_dw_2t": {"conv": "onednn_dw_2t"},
    "conv_onednn_all": {"conv": "onednn_all"},
    "conv_xla_onednn": {"conv": "xla_onednn"},
    "conv_xla_onednn_all": {"conv": "xla_onednn_all"},
    "none": {
        "fusions": False,
        "attention": "xla",
        "norm": "autodiff",
        "dropout": "jax",
        "conv": "xla",
    },
    "relu_activation": {"overrides": {"model.activation": "relu"}},
    "no_norm": {"overrides": {"model.norm": "none"}},
}


def define_flags():
    define_measurement_flags()
    define_runtime_flag()
    flags.DEFINE_integer("rounds", 3, "Alternating rounds over the variants.")
    flags.DEFINE_list("variants", list(VARIANTS), f"Variants to build, of {list(VARIANTS)}.")
    flags.DEFINE_bool(
        "peer", False, "Also time the PyTorch peer (cpu_profile's, full step) in each round."
    )
    flags.DEFINE_integer(
        "warmup_rounds", 0, "Rounds timed first and left out (the heap grows in the first)."
    )
    flags.DEFINE_string("out", "", "Also write the JSON here.")


def build(
    config,
    forward_batch: int,
    fusions=True,
    attention="lab",
    norm="lab",
    dropout="lab",
    conv="lab",
    overrides=None,
    fusion_set=None,
):
    """benchmarks.cpu_profile's ``Ours`` (a compiled train step and forward) with the levers
    set while it traces and compiles, on ``config`` with ``overrides`` (dotted keys);
    ``fusion_set`` replaces ``compilation.CPU_YNN_FUSIONS`` meanwhile."""
    from benchmarks.cpu_profile import Ours
    from diffax_lab import compilation, config_lib
    from diffax_lab.models import layers

    if conv.startswith("onednn"):
        from benchmarks import onednn_ffi

        onednn_ffi.register_conv_impls()
    if conv.startswith("xla_onednn"):
        from benchmarks import xla_onednn

        xla_onednn.persistent_cache_off()
        xla_onednn.register_conv_impls()
    backend = jax.default_backend()
    tables = (
        (layers.ATTENTION_IMPL_BY_BACKEND, attention),
        (layers.NORM_BACKWARD_BY_BACKEND, norm),
        (layers.DROPOUT_IMPL_BY_BACKEND, dropout),
        (layers.CONV_IMPL_BY_BACKEND, conv),
    )
    saved = [(table, table.get(backend)) for table, _ in tables]
    saved_env = os.environ.get(compilation.FUSIONS_ENV)
    for table, value in tables:
        table[backend] = value
    if not fusions:
        os.environ[compilation.FUSIONS_ENV] = "off"
    if overrides:
        config = config_lib.apply_overrides(copy.deepcopy(config), overrides)
    saved_fusions = compilation.CPU_YNN_FUSIONS
    if fusion_set is not None:
        compilation.CPU_YNN_FUSIONS = tuple(fusion_set)
    try:
        return Ours(config, forward_batch)
    finally:
        compilation.CPU_YNN_FUSIONS = saved_fusions
        for table, value in saved:
            table[backend] = value
        if saved_env is None:
            os.environ.pop(compilation.FUSIONS_ENV, None)
        else:
            os.environ[compilation.FUSIONS_ENV] = saved_env


def main(argv):
    del argv
    runtime = configure_runtime()
    from benchmarks.cpu_profile import convolution_placement, timed

    check_choices("variants", FLAGS.variants, VARIANTS)
    built = {
        name: build(FLAGS.config, FLAGS.forward_batch, **VARIANTS[name]) for name in FLAGS.variants
    }
    peer = None
    if FLAGS.peer:
        from benchmarks.cpu_profile import Peer

        peer = Peer(FLAGS.config, FLAGS.forward_batch, "full")
    rounds = []
    for i in range(FLAGS.warmup_rounds + FLAGS.rounds):
        r = {}
        for name, ours in built.items():
            r[f"{name}_train"] = ours.B / timed(ours.train, FLAGS.iters)
            r[f"{name}_forward"] = ours.Bf / timed(ours.forward, FLAGS.iters)
        if peer is not None:
            r["torch_train"] = peer.B / timed(peer.train, FLAGS.iters)
            r["torch_forward"] = peer.Bf / timed(peer.forward, FLAGS.iters)
            for name in built:
                for k in ("train", "forward"):
                    r[f"{name}_ratio_{k}"] = r[f"{name}_{k}"] / r[f"torch_{k}"]
        if i >= FLAGS.warmup_rounds:
            rounds.append(r)
        print(json.dumps({k: round(v, 3) for k, v in r.items()}), flush=True)
    result = {
        "train_batch": next(iter(built.values())).B,
        "forward_batch": FLAGS.forward_batch,
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "cpu_runtime": runtime,
        "median": {k: float(np.median([r[k] for r in rounds])) for k in rounds[0]},
        "range": {k: [min(r[k] for r in rounds), max(r[k] for r in rounds)] for k in rounds[0]},
        # Where each variant's train step runs its convolutions (XLA's own or YNNPACK's).
        "train_convolutions": {
            name: convolution_placement(ours.step.as_text()) for name, ours in built.items()
        },
        "rounds": rounds,
    }
    print_json(result, FLAGS.out)


if __name__ == "__main__":
    define_flags()
    app.run(main)
