"""Evaluators chosen by name from ``config.eval.metrics``, as big_vision's are.

Each module here holds one ``Evaluator`` class::

    Evaluator(task, workdir, judge=None)   # judge: a feature extractor, handed in
      .prepare()                           # loads what it needs before anything compiles
      .run(ctx: Context) -> dict           # numbers for the report

An evaluator asks the task for what it needs by documented hooks (``test_batches``,
``eval_loss``, ``eval_samples``, ...) and never imports a task. ``metrics/`` stays pure
functions of features. Names map to modules in ``METRICS``; a new evaluator is one module
and one entry there.
"""

from __future__ import annotations

import functools
import importlib
import time

import jax

from diffax_lab.errors import ConfigError

# metric name -> evaluator module (several metrics can come from one module)
METRICS = {
    "loss": "loss",
    "fd": "sample_quality",
    "kid": "sample_quality",
    "pr": "sample_quality",
    "bpd": "bpd",
    "ode_bpd": "ode_bpd",
    "clip_score": "clip_score",
    "accuracy": "accuracy",
    "zero_shot": "zero_shot",
    "reconstruction": "reconstruction",
    "fid_inception": "inception",
    "kid_inception": "inception",
    "psnr": "upsampling",
    "ssim": "upsampling",
}


def get(name: str):
    """The Evaluator class of metric ``name``."""
    if name not in METRICS:
        raise ConfigError(
            f"config.eval.metrics: unknown metric {name!r}; known: {sorted(METRICS)}."
        )
    return importlib.import_module(f"diffax_lab.evaluators.{METRICS[name]}").Evaluator


def build(task, workdir: str, metrics, judge=None) -> list:
    """One evaluator per module among ``metrics``, in order, each told which it reports."""
    modules: dict[str, list[str]] = {}
    for m in metrics:
        get(m)  # refuses unknown names
        modules.setdefault(METRICS[m], []).append(m)
    return [get(ms[0])(task, workdir, judge=judge, metrics=tuple(ms)) for ms in modules.values()]


def needs_judge(metrics) -> bool:
    return any(getattr(get(m), "needs_judge", False) for m in metrics)


class Context:
    """What one evaluation shares: the parameters, keys, and the samples (drawn once)."""

    def __init__(self, task, params, key, sample_key=None):
        self.task, self.params, self.key = task, params, key
        self.sample_key = jax.random.fold_in(key, 1) if sample_key is None else sample_key
        self.sampled = False

    @functools.cached_property
    def samples(self):
        """(uint8 samples [N, H, W, C], the class asked of each or None, info dict)."""
        n = self.task.config.eval.num_samples
        t0 = time.perf_counter()
        fake_u8, y, info = self.task.eval_samples(self.params, n, self.sample_key)
        info = {
            "num_generated": int(len(fake_u8)),
            **info,
            "sample_seconds": time.perf_counter() - t0,
        }
        self.sampled = True
        return fake_u8, y, info


class EvaluatorBase:
    """Holds the task, the workdir, the judge and the metric names an evaluator reports."""

    needs_judge = False
    during_training = False  # may run every eval.every_steps during training

    def __init__(self, task, workdir: str, judge=None, metrics=()):
        self.task, self.config, self.workdir = task, task.config, workdir
        self.judge, self.metrics = judge, metrics

    def prepare(self) -> None:
        pass

    def run(self, ctx: Context) -> dict:
        raise NotImplementedError
