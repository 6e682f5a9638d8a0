"""The lab in a notebook: configs, training, sampling, evaluation and pictures in a few lines.

    from diffax_lab import api
    cfg = api.config("ddpm:tiny", **{"train.num_steps": 200})  # named config + overrides
    run = api.train(cfg, "workdirs/nb")   # in-process, progress bar; returns a Run
    run.metrics                           # pandas DataFrame of metrics.jsonl
    run = api.load("workdirs/nb")         # config, task and EMA weights of a finished run
    x = run.sample(16, sampler="ddim", steps=50, guidance=2.0, seed=0)  # uint8 [n, H, W, C]
    run.evaluate(metrics=("loss", "fd"), num_samples=256)              # dict
    api.show(x)                           # inline grid; run.forward_strip(), run.reverse_strip()
    df = api.sweep(cfg, {"model.attention_resolutions": [(), (16,)]}, "workdirs/sweep")

Everything goes through the same code as ``python -m diffax_lab.main``: ``modes.train.run``
trains, the task's ``generate`` samples, the evaluators of ``modes.common`` evaluate. A Run
keeps one task per sampling/evaluation setting (its jitted sampler with it), so repeated
calls with the same sampler, steps and batch compile once; the guidance weight is an
argument of the compiled sampler, not a constant of it. Nothing is global: every Run holds
its own config copy, tasks and compiled functions. The process-wide state is compiled code
only (``diffax_lab.compilation``): JAX's persistent compilation cache, which importing this
module points at the user's cache directory ($DIFFAX_JAX_CACHE, ``off`` to disable), so a
notebook restarted on the same config loads its compiled steps instead of compiling again;
and, within one process, the executables of train steps and samplers kept by program text
(``compilation.compile_lowered``), so training the same config again (a sweep point rerun,
a cell run twice) reuses the executable instead of reading it back from disk.
"""

from __future__ import annotations

import copy
import glob
import json
import os

import jax
import numpy as np

from diffax_lab import compilation, config_lib, evaluators, sharding
from diffax_lab import sweep as sweep_lib
from diffax_lab.data import load_split, pipeline
from diffax_lab.errors import ConfigError
from diffax_lab.modes import common
from diffax_lab.modes import evaluate as evaluate_mode
from diffax_lab.modes import train as train_mode
from diffax_lab.tasks import registry

__all__ = [
    "Run",
    "config",
    "evaluations_frame",
    "grid_figure",
    "load",
    "metrics_frame",
    "show",
    "sweep",
    "sweep_point_name",
    "train",
    "train_parallel",
]

compilation.enable_persistent_cache()
compilation.configure_cpu_runtime()  # before the first program runs


# ----- configs -----
def config(name, /, **overrides):
    """A config from ``"ddpm:tiny"`` / ``"configs/ddpm.py:cpu"`` (or a ConfigDict, copied)
    with dotted overrides: ``api.config("ddpm:tiny", **{"train.num_steps": 10})``.

    Values may be Python values or command-line text (``"true"``, ``"(1, 2)"``); each is
    checked and typed as the field, and an unknown field is refused with the closest name.
    """
    cfg = copy.deepcopy(name) if not isinstance(name, str) else config_lib.load_config(name)
    return config_lib.apply_string_overrides(cfg, overrides)


def with_overrides(cfg, overrides: dict | None):
    """A copy of ``cfg`` with ``overrides`` (dotted keys) applied; ``cfg`` is unchanged."""
    return config_lib.apply_string_overrides(copy.deepcopy(cfg), dict(overrides or {}))


# ----- the files a run writes -----
def metrics_frame(workdir: str):
    """DIR/metrics.jsonl (train metrics every train.log_every steps, eval_* of periodic
    evaluations) as a DataFrame with one row per step."""
    import pandas as pd

    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return pd.DataFrame(columns=["step"])
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    if not records:
        return pd.DataFrame(columns=["step"])
    return pd.DataFrame(records).groupby("step", as_index=False).first()


def evaluations_frame(workdir: str):
    """Every DIR/eval/step_*.json report (``--mode=eval``, ``Run.evaluate(save=True)``)
    as a DataFrame, one row a report, with its file name in ``report``."""
    import pandas as pd

    rows = []
    for path in sorted(glob.glob(os.path.join(workdir, "eval", "step_*.json"))):
        with open(path) as f:
            rows.append({"report": os.path.basename(path)[:-5], **json.load(f)})
    return pd.DataFrame(rows)


# ----- runs -----
class Run:
    """A trained run: its config, task and EMA parameters, sampled and evaluated in-process."""

    def __init__(self, cfg, workdir: str, task, params, step: int):
        self.config, self.workdir = cfg, os.path.abspath(workdir)
        self.task, self.params, self.step = task, params, int(step)
        self.mesh = task.mesh
        self._tasks = {self._key(cfg): task}  # config JSON -> task (its compiled sampler)
        self._judges: dict = {}

    def __repr__(self):
        return f"Run({self.task.name!r}, step={self.step}, workdir={self.workdir!r})"

    @staticmethod
    def _key(cfg) -> str:
        return cfg.to_json_best_effort(sort_keys=True)

    @property
    def metrics(self):
        """The logged train (and periodic eval_*) metrics, a DataFrame read from the workdir."""
        return metrics_frame(self.workdir)

    @property
    def evaluations(self):
        """The saved evaluation reports of this workdir, a DataFrame."""
        return evaluations_frame(self.workdir)

    def task_for(self, overrides: dict | None = None):
        """The task of this run's config with ``overrides`` (checked), built once per
        distinct config and kept, with its jitted functions, for later calls."""
        cfg = with_overrides(self.config, overrides)
        key = self._key(cfg)
        if key not in self._tasks:
            registry.check_config(cfg)
            task = registry.build(cfg, self.mesh)
            task.load_resources(self.workdir, "eval")  # frozen encoders, as --mode=eval
            self._tasks[key] = task
        task = self._tasks[key]
        if task.config.sample.get("classifier_scale", 0) > 0 and task.classifier is None:
            base = self._guidance_classifier()
            task.attach_classifier(*base)
        return task

    def _guidance_classifier(self):
        if getattr(self.task, "classifier", None) is None:
            if not self.config.sample.get("classifier_workdir", ""):
                raise ConfigError(
                    "classifier guidance needs config.sample.classifier_workdir: the workdir "
                    "of a noise-conditioned classifier (configs/classifier.py)."
                )
            self.task.load_guidance_classifier(self.mesh)
        return self.task.classifier

    def _sample_overrides(self, n, sampler, steps, guidance, classifier_scale):
        """(the overrides of a sampling call, those that name its compiled sampler)."""
        s = self.config.sample
        o = {"sample.batch_size": min(int(n), s.batch_size)}
        if sampler is not None:
            o["sample.sampler"] = sampler
        if steps is not None:
            o["sample.num_steps"] = int(steps)
        if guidance is not None:
            o["sample.guidance_scale"] = float(guidance)
        if classifier_scale is not None:
            o["sample.classifier_scale"] = float(classifier_scale)
        # The guidance weights reach the compiled sampler as arguments: one task serves all.
        cache = dict(o)
        cache.pop("sample.guidance_scale", None)
        cache.pop("sample.classifier_scale", None)
        if classifier_scale:
            cache["sample.classifier_scale"] = 1.0  # guided: the classifier's gradient traced
        return o, cache

    def _check_can_sample(self):
        if not self.task.can_sample:
            raise ConfigError(f"A {self.task.name} run has nothing to sample.")

    def sample(
        self,
        n: int = 16,
        *,
        sampler: str | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        classifier_scale: float | None = None,
        seed: int = 0,
        labels=None,
    ) -> np.ndarray:
        """``n`` samples as uint8 [n, H, W, C]: ``sampler`` (ddpm, ddim, dpm_solver++, euler,
        heun, pc, ode ...), ``steps`` (0 = all T), CFG weight ``guidance``, classifier
        guidance ``classifier_scale``; the config's values where left None. ``labels``
        (classes, or condition vectors) are cycled over the samples."""
        self._check_can_sample()
        o, cache = self._sample_overrides(n, sampler, steps, guidance, classifier_scale)
        full = with_overrides(self.config, o)
        registry.check_config(full)  # e.g. guidance on a model trained without dropout
        task = self.task_for(cache)
        s = full.sample
        imgs, _, _ = task.generate(
            self.params,
            int(n),
            jax.random.PRNGKey(seed),
            labels=labels,
            guidance_scale=s.guidance_scale,
            classifier_scale=s.classifier_scale,
        )
        return np.asarray(pipeline.to_uint8(imgs))

    def forward_strip(self, num: int = 8, image=None, seed: int = 0):
        """(uint8 frames [num, H, W, C], times t): ``image`` (default: the first test image)
        noised by q(x_t | x_0) at num - 1 evenly spaced steps, the clean image first."""
        if image is None:
            image = load_split(self.config.data, "test")[0][0]
        frames, times = self.task.forward_strip(np.asarray(image), num, jax.random.PRNGKey(seed))
        return frames, np.asarray(times)

    def reverse_strip(
        self, num: int = 8, *, sampler=None, steps=None, guidance=None, seed: int = 0, label=None
    ):
        """(uint8 frames [num + 1, H, W, C], times t): the x_t the network sees along one
        reverse trajectory at ``num`` evenly spaced points, then the sample (t = 0)."""
        self._check_can_sample()
        o, cache = self._sample_overrides(1, sampler, steps, guidance, None)
        task = self.task_for(cache)
        if task.adaptive_sampler:
            raise ConfigError(f"sampler {task.config.sample.sampler!r} keeps no trajectory.")
        s = with_overrides(self.config, o).sample
        labels = None if label is None else [label]
        imgs, traj, times = task.generate(
            self.params,
            1,
            jax.random.PRNGKey(seed),
            labels=labels,
            num_trajectory=num,
            guidance_scale=s.guidance_scale,
            classifier_scale=s.classifier_scale,
        )
        frames = np.concatenate(
            [np.asarray(pipeline.to_uint8(traj[:, 0])), np.asarray(pipeline.to_uint8(imgs[:1]))]
        )
        return frames, np.asarray([*times, 0.0])

    def _judge(self, cfg):
        path = cfg.eval.judge_workdir
        if path not in self._judges:
            self._judges[path] = common.load_judge(cfg, self.mesh, ("fd",))
        return self._judges[path]

    def evaluate(
        self,
        metrics=None,
        num_samples: int | None = None,
        *,
        sampler=None,
        steps=None,
        guidance=None,
        classifier_scale=None,
        seed: int | None = None,
        overrides: dict | None = None,
        save: bool = False,
    ) -> dict:
        """The evaluators of ``metrics`` (default: the task's) on the EMA weights, as
        ``--mode=eval`` runs them: a dict of numbers. ``num_samples`` images are drawn for
        the sample metrics with ``sampler``/``steps``/``guidance``; ``overrides`` sets any
        other config field (``{"eval.judge_workdir": ..., "eval.num_reference": 500}``).
        ``save`` also writes DIR/eval/step_NNNNNN_<setting>.json."""
        o = dict(overrides or {})
        if metrics is not None:
            o["eval.metrics"] = tuple(metrics)
        if num_samples is not None:
            o["eval.num_samples"] = int(num_samples)
        for field, v in (
            ("sampler", sampler),
            ("num_steps", steps),
            ("guidance_scale", guidance),
            ("classifier_scale", classifier_scale),
        ):
            if v is not None:
                o[f"sample.{field}"] = v
        # Guidance weights are arguments of the compiled sampler: one task serves them all.
        s0 = self.config.sample
        scales = {  # always both: a cached task keeps what the last call set
            "sample.guidance_scale": o.pop("sample.guidance_scale", s0.guidance_scale),
            "sample.classifier_scale": o.pop("sample.classifier_scale", s0.classifier_scale),
        }
        if scales.get("sample.classifier_scale"):
            o["sample.classifier_scale"] = 1.0  # guided: the classifier attached
        full = with_overrides(self.config, {**o, **scales})
        registry.check_config(full)
        task = self.task_for(o)
        for k, v in scales.items():
            task.config.sample[k.split(".")[1]] = float(v)
        cfg = task.config
        names = task.selected_metrics()
        judge = self._judge(cfg) if evaluators.needs_judge(names) else None
        evals = evaluators.build(task, self.workdir, names, judge)
        for ev in evals:
            ev.prepare()
        key = jax.random.PRNGKey(cfg.sample.seed if seed is None else seed)
        ctx = evaluators.Context(task, self.params, key)
        report = {"step": self.step, "split": "test", "ema": True}
        for ev in evals:
            report.update(ev.run(ctx))
        if save:
            tag = task.sample_tag() if ctx.sampled else ""
            evaluate_mode.write_report(self.workdir, self.step, report, tag or "api")
        return report


def load(workdir: str, overrides: dict | None = None) -> Run:
    """The finished run in ``workdir``: its saved config (+ ``overrides``, e.g. of the sample
    or eval sections), task and the EMA weights of its newest good checkpoint."""
    workdir = os.path.abspath(workdir)
    cfg = config_lib.load_run_config(workdir, "workdir")
    if overrides:
        config_lib.apply_string_overrides(cfg, overrides)
    registry.check_config(cfg)
    mesh = sharding.make_mesh(cfg.train.num_devices or None)
    task = registry.build(cfg, mesh)
    task.load_resources(workdir, "eval")
    state, step = common.restore(task, workdir)
    return Run(cfg, workdir, task, state["ema_params"], step)


def train(cfg, workdir: str, progress: bool = True) -> Run:
    """Trains ``cfg`` in ``workdir`` in this process (``modes.train.run``: resumes what is
    there, up to train.num_steps) and returns the Run of its final EMA weights."""
    cfg = copy.deepcopy(cfg)
    cfg.train.progress_bar = bool(progress)
    train_mode.run(cfg, workdir)
    return load(workdir)


def sweep(cfg, grid: dict, root: str, **kwargs):
    """``diffax_lab.sweep.run``: one workdir a grid point, trained and evaluated (resumable);
    returns the DataFrame of their evaluations. ``steps=[...]`` evaluates each point at
    those step counts; ``parallel=N`` runs N points at once, each in its own process."""
    return sweep_lib.run(cfg, grid, root, **kwargs)


def train_parallel(runs: dict, parallel: int | None = None, log=print) -> None:
    """Trains ``{workdir: cfg}`` at once, each in its own process (``parallel`` at a time,
    default all; 0: one after another in this process): e.g. a model, its judge and a
    guidance classifier. Finished workdirs are skipped (``load`` them afterwards)."""
    if parallel == 0:
        for workdir, cfg in runs.items():
            cfg = copy.deepcopy(cfg)
            cfg.train.progress_bar = False
            train_mode.run(cfg, workdir)
        return
    cfgs = {}
    for workdir, cfg in runs.items():
        cfg = copy.deepcopy(cfg)
        cfg.train.progress_bar = False  # a worker's log is a file
        registry.check_config(cfg)  # here, before any process starts
        cfgs[workdir] = cfg
    sweep_lib.train_parallel(cfgs, parallel or len(cfgs), log)


def sweep_point_name(cfg, point: dict) -> str:
    """The directory (under the sweep's root) of one point of ``sweep(cfg, ...)``."""
    return sweep_lib.point_name(sweep_lib.typed_point(cfg, point))


# ----- pictures -----
def show(images, titles=None, ncols: int | None = None, size: float = 1.2, title=None) -> None:
    """A grid of uint8 images [N, H, W, C] (or [N, H, W]) inline (``grid_figure`` for the
    figure itself). ``titles``: one caption per image (e.g. the times of a strip)."""
    import matplotlib.pyplot as plt

    grid_figure(images, titles, ncols, size, title)
    plt.show()


def grid_figure(images, titles=None, ncols: int | None = None, size: float = 1.2, title=None):
    """The matplotlib figure of ``show``'s grid, not shown."""
    import matplotlib.pyplot as plt

    x = np.asarray(images)
    if x.ndim == 3:
        x = x[..., None]
    n = x.shape[0]
    ncols = ncols or min(n, 8)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            img = x[i, ..., 0] if x.shape[-1] == 1 else x[i]
            ax.imshow(img, cmap="gray" if x.shape[-1] == 1 else None, vmin=0, vmax=255)
            if titles is not None:
                ax.set_title(str(titles[i]), fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
