"""``zero_shot``: a CLIP's zero-shot test accuracy with its first caption template
("a photo of a {class}"), argmax over the classes of the image-text cosine."""

from __future__ import annotations

from diffax_lab.evaluators import Context, EvaluatorBase


class Evaluator(EvaluatorBase):
    def prepare(self):
        self.images, self.labels, self.bs = self.task.test_batches()

    def run(self, ctx: Context) -> dict:
        acc = self.task.zero_shot_accuracy(ctx.params, self.images, self.labels, self.bs)
        return {
            "num_examples": len(self.images),
            "prompt": self.task.templates[0],
            "zero_shot_accuracy": acc,
        }
