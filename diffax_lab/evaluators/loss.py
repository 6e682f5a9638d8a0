"""``loss``: the held-out training objective of the EMA weights on the test split, each test
image conditioned as in training (its label, or its own CLIP embedding), never dropped."""

from __future__ import annotations

import jax
import numpy as np

from diffax_lab.evaluators import Context, EvaluatorBase


class Evaluator(EvaluatorBase):
    def prepare(self):
        self.images, labels, self.bs = self.task.test_batches()
        self.conds = self.task.eval_conditions(labels, self.workdir)
        self.batch_loss = jax.jit(self.task.eval_loss)

    def run(self, ctx: Context) -> dict:
        results = []
        for b in range(len(self.images) // self.bs):
            sl = slice(b * self.bs, (b + 1) * self.bs)
            loss, aux = self.batch_loss(
                ctx.params, self.images[sl], self.conds[sl], jax.random.fold_in(ctx.key, b)
            )
            results.append(jax.device_get({"loss": loss, **aux}))
        mean = {k: float(np.nanmean([r[k] for r in results])) for k in results[0]}
        return {"num_examples": len(self.images), **{f"test_{k}": v for k, v in mean.items()}}
