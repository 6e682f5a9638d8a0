"""The "Continuous time" measurements of docs/BENCHMARKS.md: per sampler, FD and the judge's
class accuracy of conditional samples (w = 0) with network evaluations (NFE, measured for
the ODE); then bits/dim of test images by the variational bound (``bpd``) and by the
probability-flow ODE (``ode_bpd``).

    python docs/scripts/continuous_time.py WORKDIR JUDGE_WORKDIR OUT.json
"""

import json
import sys
import time

import jax
import numpy as np

from diffax_lab import config_lib, evaluators
from diffax_lab.data import load_split, pipeline
from diffax_lab.evaluators.sample_quality import compare_features
from diffax_lab.metrics.features import reference_features
from diffax_lab.sharding import make_mesh
from diffax_lab.tasks import registry

NUM = 64  # samples per setting (FD of 64 samples: biased upwards, compare at equal N only)
SETTINGS = [  # (label, sampler, steps, overrides, nfe per step or None = measured)
    ("ode rtol=atol=1e-2", "ode", 0, {"sample.rtol": 1e-2, "sample.atol": 1e-2}, None),
    ("ode rtol=atol=1e-3", "ode", 0, {"sample.rtol": 1e-3, "sample.atol": 1e-3}, None),
    ("pc 10 steps (RD + 1 Langevin)", "pc", 10, {}, 2),
    ("ddim 10", "ddim", 10, {}, 1),
    ("dpm_solver++ 10", "dpm_solver++", 10, {}, 1),
    ("edm-heun 6", "edm", 6, {}, None),
]


def main(workdir, judge_dir, out_path):
    mesh = make_mesh(1)
    base, params = registry.restore_run(workdir, mesh, "workdir")
    judge = registry.load_judge(judge_dir, mesh, NUM)
    test_u8, _ = load_split(base.config.data, "test")
    real, _ = reference_features(
        judge, base.config.data, "test", test_u8[:2000], f"{workdir}/eval/cache"
    )
    rows = []
    for label, sampler, steps, extra, per_step in SETTINGS:
        o = {"sample.sampler": sampler, "sample.num_steps": steps, "sample.batch_size": NUM}
        o.update(extra)
        cfg = config_lib.apply_overrides(config_lib.load_run_config(workdir, "w"), o)
        task = registry.build(cfg, mesh)
        conds = task.sample_conditions(NUM)
        cond = None if conds is None else jax.numpy.asarray(np.resize(conds, NUM))
        t0 = time.perf_counter()
        out = task.sample_batch(
            params, jax.random.PRNGKey(0), cond, jax.numpy.float32(0.0), None, None,
            jax.numpy.float32(0.0), num_traj=0,
        )  # fmt: skip
        fake = np.asarray(pipeline.to_uint8(jax.device_get(out.samples)))
        secs = time.perf_counter() - t0
        nfe = int(out.nfe) if out.nfe is not None else per_step * steps
        e = cfg.eval
        e.kid_subset_size, e.kid_num_subsets = 100, 10
        report = compare_features(real, judge(fake), e, jax.random.PRNGKey(1))
        acc = None if cond is None else float(np.mean(judge.predict(fake) == np.asarray(cond)))
        rows.append({"setting": label, "nfe": nfe, "fd": report["fd"], "accuracy": acc,
                     "seconds_with_compile": round(secs, 1)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    floor = compare_features(real, judge(load_split(base.config.data, "train")[0][:NUM]),
                             cfg.eval, jax.random.PRNGKey(1))  # fmt: skip
    # Bits/dim on the test split: the variational bound and the probability-flow ODE.
    o = {"eval.bpd_num_examples": 16, "eval.bpd_num_terms": 50, "eval.ode_num_examples": 16,
         "eval.batch_size": 16, "eval.ode_probes": 2, "eval.ode_rtol": 1e-3,
         "eval.ode_atol": 1e-3}  # fmt: skip
    cfg = config_lib.apply_overrides(config_lib.load_run_config(workdir, "w"), o)
    task = registry.build(cfg, mesh)
    bpd = {}
    for ev in evaluators.build(task, workdir, ("bpd", "ode_bpd")):
        ev.prepare()
        t0 = time.perf_counter()
        bpd.update(ev.run(evaluators.Context(task, params, jax.random.PRNGKey(2))))
        bpd[f"{type(ev).__module__.rsplit('.', 1)[1]}_seconds"] = time.perf_counter() - t0
        print(json.dumps(bpd), flush=True)
    with open(out_path, "w") as f:
        json.dump({"samplers": rows, "train_floor_fd": floor["fd"], "bpd": bpd}, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:4])
