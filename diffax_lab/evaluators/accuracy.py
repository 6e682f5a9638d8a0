"""``accuracy``: a classifier's test accuracy (EMA weights) on clean images and on x_t at
each t of ``eval.times`` (the task's ``eval_times``; the noise of its schedule)."""

from __future__ import annotations

import jax

from diffax_lab.evaluators import Context, EvaluatorBase


class Evaluator(EvaluatorBase):
    def prepare(self):
        self.images, self.labels, self.bs = self.task.test_batches()
        self.correct = self.task.correct_fn()

    def run(self, ctx: Context) -> dict:
        report = {"num_examples": len(self.images)}
        for t in self.task.eval_times():
            hits = sum(
                int(
                    self.correct(
                        ctx.params,
                        self.images[i : i + self.bs],
                        self.labels[i : i + self.bs],
                        t,
                        jax.random.fold_in(ctx.key, i),
                    )
                )
                for i in range(0, len(self.images), self.bs)
            )
            report["test_accuracy" if t == 0 else f"test_accuracy_t{t:g}"] = hits / len(self.images)
        return report
