"""Cascaded sampling (``config.task = "cascade"``; Ho et al. 2021, Imagen, DALL-E 2): a base
model, then one or more upsamplers, each a trained run of its own; this task trains nothing.

The ``cascade`` section names the runs and how each stage samples:

- ``base_workdir``: a diffusion (or text2img) run drawing the low-resolution images;
  ``prior_workdir`` (optional, text2img bases): an unCLIP prior (tasks/prior.py) that maps
  the CLIP text embeddings of ``prompts`` to image embeddings for the base to decode;
- ``upsampler_workdirs``: superres (diffusion) or upsampler (regression) runs, in order;
  each takes the previous stage's resolution;
- per stage ``samplers`` / ``steps`` / ``guidance`` (one entry for the base then one per
  upsampler; '' / -1 keep the run's own setting) and ``aug_levels`` (one per upsampler; -1
  = the run's sample.aug_level); ``prior_sampler`` / ``prior_steps`` / ``prior_guidance``.

Everything is drawn from ``sample.seed``: stage i uses fold_in(key, i), so a cascade is
deterministic given the seed. ``--mode=sample`` writes the final grid and a grid with one
row per stage (earlier stages resized up, nearest, for display).

How it runs through the lab's task-agnostic modes: ``--mode=sample`` restores a checkpoint
of the task's own state before it samples, and a cascade has nothing trained. So the first
``--mode=sample`` (or ``--mode=eval``) with ``--config=configs/cascade.py`` writes the
cascade's state (one placeholder scalar) as its step-0 checkpoint and its config.json into
the workdir (``load_resources``), after which the shared restore finds it and later runs
may leave ``--config`` out. ``--mode=train`` is refused with the command to use instead.
(The hook that would make this unnecessary: a ``Task.stateless = True`` class attribute
that modes/sample.py and modes/evaluate.py honour by using ``task.create_state()`` at step 0
instead of restoring.)
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from diffax_lab import checkpointing, images
from diffax_lab import workdir as workdir_lib
from diffax_lab.data import pipeline
from diffax_lab.diffusion import conditioning
from diffax_lab.errors import ConfigError
from diffax_lab.tasks import registry
from diffax_lab.tasks.base import Task
from diffax_lab.tasks.denoising import check_sample_metric_fields
from diffax_lab.tasks.registry import register

UPSAMPLER_TASKS = ("superres", "upsampler")


def _entry(values, i, default):
    values = tuple(values)
    return values[i] if i < len(values) else default


@register
class CascadeTask(Task):
    name = "cascade"
    section = "cascade"
    section_hint = "the base and upsampler workdirs: see configs/cascade.py"
    can_sample = True
    metrics = ("fd", "kid", "pr", "clip_score")

    @classmethod
    def check_config(cls, config) -> None:
        super().check_config(config)
        k = config.cascade
        if config.train.num_steps:
            raise ConfigError(
                f"config.train.num_steps={config.train.num_steps}: a cascade trains nothing; "
                "set it to 0 (configs/cascade.py does) and use --mode=sample or --mode=eval."
            )
        if not k.base_workdir:
            raise ConfigError("config.cascade.base_workdir is empty: the base model's workdir.")
        n = len(tuple(k.upsampler_workdirs))
        for field, most in (("samplers", n + 1), ("steps", n + 1), ("guidance", n + 1)):
            if len(tuple(k[field])) > most:
                raise ConfigError(
                    f"config.cascade.{field} has {len(tuple(k[field]))} entries for {n + 1} "
                    "stages (the base, then each upsampler)."
                )
        if len(tuple(k.aug_levels)) > n:
            raise ConfigError(
                f"config.cascade.aug_levels has {len(tuple(k.aug_levels))} entries for {n} "
                "upsamplers."
            )
        for s in tuple(k.aug_levels):
            if not (s == -1 or 0.0 <= s <= 1.0):
                raise ConfigError(
                    f"config.cascade.aug_levels={tuple(k.aug_levels)!r}: each in [0, 1] or -1."
                )
        if k.prior_workdir and not tuple(k.prompts):
            raise ConfigError("config.cascade.prior_workdir needs config.cascade.prompts.")
        if "clip_score" in tuple(config.eval.get("metrics", ())):
            text = config.get("text", None)
            if (
                text is None
                or not tuple(text.get("class_names", ()))
                or "{}" not in text.get("template", "")
            ):
                raise ConfigError(
                    "config.eval.metrics asks for 'clip_score' of a cascade: give config.text "
                    "with class_names and a template ('a photo of a {}'), as configs/"
                    "cascade.py:unclip does; its base must be a text2img run."
                )
        if "sample" not in config or config.sample.num < 1:
            raise ConfigError("config.sample.num must be >= 1: the images the cascade draws.")
        check_sample_metric_fields(config)

    def build(self):
        self.model = None
        self.stages = []  # (task, params, workdir) of the base then each upsampler
        self.prior = None

    def init_params(self, key):
        return {"placeholder": jnp.zeros(())}  # a cascade has no weights of its own

    def train_loss(self, params, x0, labels, keys):
        return jnp.zeros(()), {}

    def default_metrics(self):
        return ("fd",) if self.config.eval.judge_workdir else ()

    # ----- the stages -----
    def load_resources(self, workdir: str, mode: str) -> None:
        if mode == "train":
            raise ConfigError(
                "A cascade trains nothing: run it with --mode=sample (or --mode=eval) and the "
                "same --config/--workdir; train its stages with their own configs."
            )
        k = self.config.cascade
        stages = [("config.cascade.base_workdir", k.base_workdir)] + [
            (f"config.cascade.upsampler_workdirs[{i}]", w)
            for i, w in enumerate(tuple(k.upsampler_workdirs))
        ]
        self.stages = []
        for i, (field, w) in enumerate(stages):
            task, params = registry.restore_run(w, self.mesh, field)
            if i and task.name not in UPSAMPLER_TASKS:
                raise ConfigError(
                    f"{field}={w!r} is a {task.name!r} run, not an upsampler "
                    f"({' or '.join(UPSAMPLER_TASKS)})."
                )
            if not i and (task.name in UPSAMPLER_TASKS or not hasattr(task, "generate")):
                raise ConfigError(f"{field}={w!r} is a {task.name!r} run, not a diffusion base.")
            self.override_sampling(task, i, field)
            task.load_resources(w, "sample")
            self.stages.append((task, params, w))
        prev = self.stages[0][0].image_shape
        for task, _, w in self.stages[1:]:
            want = (task.low_size, task.low_size, task.config.data.channels)
            if tuple(prev) != want:
                raise ConfigError(
                    f"The upsampler in {w} takes {want} images; the stage before makes {prev}."
                )
            prev = task.image_shape
        if tuple(prev) != tuple(self.image_shape):
            raise ConfigError(
                f"The cascade ends at {prev}, but config.data says "
                f"{self.image_shape}: set data.image_size / data.channels to match."
            )
        base = self.stages[0][0]
        text = base.name == "text2img"
        if text and not tuple(k.prompts):
            raise ConfigError("A text2img base needs config.cascade.prompts.")
        if k.prior_workdir:
            if not text:
                raise ConfigError("config.cascade.prior_workdir needs a text2img base.")
            prior, params = registry.restore_run(
                k.prior_workdir, self.mesh, "config.cascade.prior_workdir", task="prior"
            )
            p = prior.config.sample
            p.sampler = k.prior_sampler or p.sampler
            p.num_steps = p.num_steps if k.prior_steps < 0 else k.prior_steps
            p.guidance_scale = p.guidance_scale if k.prior_guidance < 0 else k.prior_guidance
            type(prior).check_config(prior.config)
            if prior.config.prior.dim != base.config.model.cond_dim:
                raise ConfigError(
                    f"The prior in {k.prior_workdir} makes {prior.config.prior.dim}-dim "
                    f"embeddings; the base conditions on {base.config.model.cond_dim}."
                )
            self.prior = (prior, params)
        self.write_own_state(workdir)

    def override_sampling(self, task, i: int, field: str) -> None:
        """Stage i's sampler, steps, guidance (and aug level) from the cascade section."""
        k, s = self.config.cascade, task.config.sample
        if task.name == "upsampler":
            return  # a regression: nothing to choose
        s.sampler = _entry(k.samplers, i, "") or s.sampler
        steps = _entry(k.steps, i, -1)
        s.num_steps = s.num_steps if steps < 0 else steps
        w = _entry(k.guidance, i, -1.0)
        s.guidance_scale = s.guidance_scale if w < 0 else w
        if i:
            a = _entry(k.aug_levels, i - 1, -1.0)
            s.aug_level = s.aug_level if a < 0 else a
        s.batch_size = min(s.batch_size, self.config.sample.batch_size) or s.batch_size
        try:
            type(task).check_config(task.config)
        except ConfigError as e:
            raise ConfigError(f"Stage {i} ({field}) with the cascade's settings: {e}") from None

    def write_own_state(self, workdir: str) -> None:
        """The cascade's step-0 checkpoint and config.json, so that the shared restore of
        --mode=sample/eval finds one (see the module docstring)."""
        if workdir_lib.has_checkpoints(workdir):
            return
        if jax.process_index() == 0:
            workdir_lib.make_writable(workdir)
            workdir_lib.write_config(workdir, self.config)
        ckpt = checkpointing.Checkpointer(workdir, self.config.train.keep_checkpoints)
        ckpt.save(0, self.create_state())
        ckpt.wait()
        ckpt.close()
        logging.info("Wrote the cascade's (weightless) step-0 state and config to %s.", workdir)

    def stage_names(self) -> list[str]:
        names = []
        for i, (task, _, _) in enumerate(self.stages):
            s, h = task.config.sample, task.image_shape[0]
            if task.name == "upsampler":
                names.append(f"{h}px SRResNet")
                continue
            name = f"{h}px {task.name} {s.sampler}{task.sample_steps}"
            if s.guidance_scale:
                name += f" w={s.guidance_scale:g}"
            if i:
                name += f" s={s.aug_level:g}"
            names.append(name)
        return names

    def base_conditions(self, num: int, key, prompts=None):
        """The base's conditions: text2img: the CLIP text embeddings of ``prompts`` (default
        cascade.prompts, in turn), or with a prior the image embeddings it draws for them;
        else the base's own (labels)."""
        base = self.stages[0][0]
        if base.name != "text2img":
            return None
        prompts = list(prompts or self.config.cascade.prompts)
        prompts = [prompts[i % len(prompts)] for i in range(num)]
        emb = base.encoder.embed_texts(prompts)
        if self.prior is None:
            return emb
        prior, params = self.prior
        out, _, _ = prior.generate(params, num, jax.random.fold_in(key, 99), labels=emb)
        return prior.normalise(out)

    def run_stages(self, num: int, key, prompts=None):
        """[per stage: float images [-1, 1]] and [per stage: seconds]."""
        outs, secs = [], []
        base, params, _ = self.stages[0]
        t0 = time.perf_counter()
        cond = self.base_conditions(num, key, prompts)
        x, _, _ = base.generate(params, num, jax.random.fold_in(key, 0), labels=cond)
        outs.append(np.asarray(x))
        secs.append(time.perf_counter() - t0)
        for i, (task, params, _) in enumerate(self.stages[1:], start=1):
            t0 = time.perf_counter()
            x = task.upsample(params, outs[-1], jax.random.fold_in(key, i))
            outs.append(np.asarray(x))
            secs.append(time.perf_counter() - t0)
        return outs, secs

    def sample(self, params, workdir: str, step: int, key) -> dict:
        num = self.config.sample.num
        outs, secs = self.run_stages(num, key)
        size = self.image_shape[0]
        u8 = [np.asarray(pipeline.to_uint8(o)) for o in outs]
        shown = [
            np.asarray(pipeline.to_uint8(conditioning.resize_up(jnp.asarray(o), size, "nearest")))
            if o.shape[1] != size
            else x
            for o, x in zip(outs, u8, strict=True)
        ]
        out_dir = os.path.join(workdir, "samples")
        grid = os.path.join(out_dir, "cascade.png")
        images.save_grid(grid, u8[-1])
        stages = os.path.join(out_dir, "cascade_stages.png")
        names = self.stage_names()
        images.save_labelled_rows(stages, shown, names)
        if jax.process_index() == 0:
            np.savez_compressed(
                os.path.join(out_dir, "cascade.npz"),
                **{f"stage{i}": x for i, x in enumerate(u8)},
            )
        for n, s in zip(names, secs, strict=True):
            logging.info("Stage %s: %.2f s for %d images.", n, s, num)
        logging.info("Wrote %s and %s.", grid, stages)
        return {
            "step": step,
            "grid": grid,
            "stages_grid": stages,
            "samples": u8[-1],
            "stages": u8,
            "stage_seconds": secs,
        }

    def eval_samples(self, params, num, key):
        """The final stage's images; a text2img base draws from the class prompts
        (text.template with each of text.class_names in turn) when config.text is given,
        so that the judge's accuracy and the CLIP score know the class asked."""
        prompts = self.class_prompts() if "text" in self.config else None
        outs, secs = self.run_stages(num, key, prompts)
        info = {
            "stages": self.stage_names(),
            "stage_seconds": [float(s) for s in secs],
            "prior": bool(self.prior),
        }
        return np.asarray(pipeline.to_uint8(outs[-1])), self.requested_labels(num), info

    def requested_labels(self, num):
        base = self.stages[0][0]
        if base.name == "text2img":
            return np.arange(num) % len(self.class_prompts()) if "text" in self.config else None
        if not getattr(base, "num_labels", 0):
            return None
        return base.requested_labels(num)

    # ----- the clip_score evaluator's hooks (a text2img base's CLIP) -----
    def class_prompts(self) -> list[str]:
        t = self.config.text
        return [t.template.format(n) for n in t.class_names]

    @property
    def encoder(self):
        return self.stages[0][0].encoder

    independent_encoder = None

    def image_embeddings(self, encoder, images_u8, split: str, workdir: str):
        return self.stages[0][0].image_embeddings(encoder, images_u8, split, workdir)
