"""How well samples show the class asked for, per sampler, step count and guidance.

    python -m benchmarks.guidance_accuracy --workdir=workdirs/cfg_cpu \
        --judge=workdirs/clean_cpu --runs=ddim:50:w=0,ddim:50:w=1,ddpm:0:w=1 \
        [--guide=workdirs/noisy_cpu] [--num=100] [--batch_size=50] [--out=FILE]

For each run ``SAMPLER:STEPS[:w=W][:s=S]`` (STEPS 0 = all T; w the CFG weight, s the
classifier-guidance scale with the noise-conditioned classifier of ``--guide``) it draws
``--num`` samples of the trained model in ``--workdir`` (EMA weights, labels cycling through
the classes, the same seed in every run) and reports the accuracy with which the clean
classifier of ``--judge`` recognises the requested class, and FD, KID and precision/recall
in that classifier's feature space against the real test set (features cached in
``--workdir``/eval/cache), with the sampling time measured after compilation (compile time
reported apart). Prints one JSON object per run.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import ConfigDict

from diffax_lab import checkpointing, data, sharding
from diffax_lab.config_lib import load_run_config
from diffax_lab.data import pipeline
from diffax_lab.evaluators.sample_quality import compare_features
from diffax_lab.metrics.features import reference_features
from diffax_lab.tasks import registry

FLAGS = flags.FLAGS


def define_flags():
    """Defines this script's flags; called only when it runs as a script, so that
    importing it (tests, notebooks, other benchmarks) defines no global flags."""
    flags.DEFINE_string("workdir", None, "Workdir of the trained diffusion model.")
    flags.DEFINE_string(
        "judge", None, "Workdir of the clean classifier (configs/classifier.py:clean)."
    )
    flags.DEFINE_string("guide", "", "Workdir of the noise-conditioned classifier (runs with s=).")
    flags.DEFINE_list("runs", ["ddim:50:w=1"], "SAMPLER:STEPS[:w=W][:s=S], comma-separated.")
    flags.DEFINE_integer("num", 100, "Samples per run.")
    flags.DEFINE_integer("batch_size", 50, "Samples per compiled batch.")
    flags.DEFINE_integer("seed", 0, "Sampling seed (the same in every run).")
    flags.DEFINE_string("out", "", "Also append the JSON lines here.")
    flags.mark_flags_as_required(["workdir", "judge"])


# FD / KID / precision-recall settings (KID subsets of min(1000, num) samples).
METRICS = ConfigDict({"kid_num_subsets": 50, "kid_subset_size": 1000, "pr_k": 3})


def parse_run(spec: str) -> dict:
    parts = spec.split(":")
    if len(parts) < 2:
        raise ValueError(f"--runs entry {spec!r} must be SAMPLER:STEPS[:w=W][:s=S].")
    run = {"sampler": parts[0], "num_steps": int(parts[1]), "w": 0.0, "s": 0.0}
    for p in parts[2:]:
        key, _, value = p.partition("=")
        if key not in ("w", "s") or not value:
            raise ValueError(f"--runs entry {spec!r}: options are w=W and s=S, got {p!r}.")
        run[key] = float(value)
    return run


def load_config(workdir: str) -> ConfigDict:
    return load_run_config(workdir)


def run_one(base: ConfigDict, run: dict, params, mesh, judge, guide, real) -> dict:
    config = ConfigDict(base.to_dict())
    s = config.sample
    s.sampler, s.num_steps = run["sampler"], run["num_steps"]
    s.guidance_scale, s.classifier_scale = run["w"], run["s"]
    s.classifier_workdir = FLAGS.guide if run["s"] > 0 else ""
    s.batch_size = FLAGS.batch_size
    registry.check_config(config)
    exp = registry.build(config, mesh)
    num_labels = config.model.num_classes or judge.num_classes
    cparams = None
    if run["s"] > 0:
        if guide is None:
            raise ValueError(f"Run {run} uses classifier guidance: pass --guide.")
        exp.check_guidance_classifier(guide[0])
        exp.attach_classifier(*guide)
        cparams = guide[1]
    labels = np.arange(num_labels, dtype=np.int32)
    bs = FLAGS.batch_size
    key = jax.random.PRNGKey(FLAGS.seed)
    args = lambda b: (  # noqa: E731
        params,
        jax.random.fold_in(key, b),
        jnp.asarray(labels[np.arange(b * bs, (b + 1) * bs) % num_labels]),
        jnp.float32(run["w"]),
        None,
        cparams,
        jnp.float32(run["s"]),
    )
    t0 = time.perf_counter()
    compiled = exp.sample_batch.lower(*args(0), num_traj=0).compile()
    compile_s = time.perf_counter() - t0
    batches = -(-FLAGS.num // FLAGS.batch_size)
    outs = []
    t0 = time.perf_counter()
    for b in range(batches):
        outs.append(compiled(*args(b)).samples)
    samples = np.asarray(pipeline.to_uint8(np.concatenate(jax.device_get(outs))))[: FLAGS.num]
    sample_s = time.perf_counter() - t0
    # The class each sample was asked for (cycled as generate does); an unguided
    # unconditional model ignores it, which gives the chance baseline.
    y = np.arange(FLAGS.num) % num_labels
    pred = judge.predict(samples)
    quality = compare_features(real, judge(samples), METRICS, jax.random.PRNGKey(FLAGS.seed))
    return {
        **run,
        "num_steps": run["num_steps"] or config.diffusion.num_timesteps,
        "num_samples": int(FLAGS.num),
        "num_real": int(len(real)),
        "feature_space": judge.name,
        "accuracy": float(np.mean(pred == y)),
        **quality,
        "sample_seconds": round(sample_s, 2),
        "compile_seconds": round(compile_s, 2),
        "device": jax.devices()[0].device_kind,
    }


def main(argv):
    del argv
    runs = [parse_run(r) for r in FLAGS.runs]  # bad specs fail before anything loads
    mesh = sharding.make_mesh(1)
    base = load_config(FLAGS.workdir)
    state, step = checkpointing.restore_latest(
        FLAGS.workdir, registry.build(base, mesh).restore_target
    )
    judge = registry.load_judge(FLAGS.judge, mesh, FLAGS.batch_size, field="--judge")
    guide = (
        registry.restore_run(FLAGS.guide, mesh, "--guide", "classifier") if FLAGS.guide else None
    )
    test_u8 = data.load_split(base.data, "test")[0]
    cache = os.path.join(FLAGS.workdir, "eval", "cache")
    real, _ = reference_features(judge, base.data, "test", test_u8, cache)
    for run in runs:
        result = {
            "workdir": FLAGS.workdir,
            "step": step,
            **run_one(base, run, state["ema_params"], mesh, judge, guide, real),
        }
        line = json.dumps(result)
        print(line, flush=True)
        if FLAGS.out:
            with open(FLAGS.out, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    define_flags()
    app.run(main)
