"""``bpd``: bits/dim of the variational bound (DDPM eq. 5, ``metrics.bits_per_dim``) on
``eval.bpd_num_examples`` test images with the EMA weights, each conditioned as in training
(the true label; a text-to-image model's test image's own CLIP embedding), with the reverse
variance ``sample.variance``. A figure conditioned on CLIP(x) is -log2 p(x | CLIP(x)): the
condition carries information about x, so it is not comparable with an unconditional one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffax_lab import metrics
from diffax_lab.data import load_split, pipeline
from diffax_lab.evaluators import Context, EvaluatorBase


class Evaluator(EvaluatorBase):
    def prepare(self):
        e = self.config.eval
        imgs, labels = load_split(self.config.data, "test")
        n = min(e.bpd_num_examples, len(imgs))
        self.bs = min(e.batch_size, n)
        n = n // self.bs * self.bs
        self.images = imgs[:n]
        self.conds = np.asarray(self.task.eval_conditions(labels, self.workdir))[:n]

    def run(self, ctx: Context) -> dict:
        c, task = self.config, self.task
        e = c.eval
        key = jax.random.fold_in(ctx.key, 2)

        def fn(x_t, t, args):
            params, cond = args
            return task.model_fn(params, cond if task.uses_condition else None)(x_t, t)

        per_image = []
        for b in range(len(self.images) // self.bs):
            sl = slice(b * self.bs, (b + 1) * self.bs)
            per_image.append(
                metrics.bits_per_dim(
                    fn,
                    task.schedule,
                    pipeline.to_model_range(self.images[sl]),
                    jax.random.fold_in(key, b),
                    prediction=c.diffusion.prediction,
                    variance=c.sample.variance,
                    num_terms=e.bpd_num_terms or None,
                    model_args=(ctx.params, jnp.asarray(self.conds[sl])),
                )
            )
        bpd = np.concatenate(per_image)
        return {
            "bpd": float(bpd.mean()),
            "bpd_sem": float(bpd.std(ddof=1) / np.sqrt(len(bpd))) if len(bpd) > 1 else None,
            "bpd_num_examples": len(self.images),
            "bpd_terms": e.bpd_num_terms or task.schedule.num_steps,
            "bpd_num_timesteps": task.schedule.num_steps,
            "bpd_variance": c.sample.variance,
        }
