"""``fd``, ``kid``, ``pr``: sample quality in a judge's feature space (the clean classifier
of ``eval.judge_workdir``, handed in by the mode).

``eval.num_samples`` samples drawn as the task draws them for evaluation (the sample
section's sampler and guidance) against ``eval.num_reference`` real test images (features
cached in DIR/eval/cache): Fréchet distance, KID (mean, std over subsets),
precision/recall, the judge's accuracy on the classes asked, and with ``eval.floor`` the
same figures for real train images (the metrics' floor). FD in a classifier's space is not
FID and is not comparable with it.
"""

from __future__ import annotations

import os

import numpy as np

from diffax_lab import metrics
from diffax_lab.data import load_split
from diffax_lab.errors import ConfigError
from diffax_lab.evaluators import Context, EvaluatorBase
from diffax_lab.metrics.features import reference_features


def compare_features(real, fake, eval_config, key) -> dict:
    """FD, KID (mean, std) and precision/recall of fake against real features."""
    e = eval_config
    kid, kid_std = metrics.kernel_distance(
        real, fake, key, num_subsets=e.kid_num_subsets, subset_size=e.kid_subset_size
    )
    precision, recall = metrics.precision_recall(real, fake, k=e.pr_k)
    return {
        "fd": metrics.frechet_distance(
            *metrics.feature_statistics(real), *metrics.feature_statistics(fake)
        ),
        "kid": kid,
        "kid_std": kid_std,
        "precision": precision,
        "recall": recall,
    }


class Evaluator(EvaluatorBase):
    needs_judge = True
    during_training = True

    def prepare(self):
        c, k = self.config, self.judge.config
        if (k.data.image_size, k.data.channels) != (c.data.image_size, c.data.channels):
            raise ConfigError(
                f"config.eval.judge_workdir={c.eval.judge_workdir!r} classifies "
                f"{k.data.image_size}x{k.data.image_size}x{k.data.channels} images; the model "
                f"makes {c.data.image_size}x{c.data.image_size}x{c.data.channels}."
            )

    def run(self, ctx: Context) -> dict:
        e, judge = self.config.eval, self.judge
        fake_u8, y, info = ctx.samples
        cache = os.path.join(self.workdir, "eval", "cache")
        test_u8 = load_split(self.config.data, "test")[0][: e.num_reference]
        real, hit = reference_features(judge, self.config.data, "test", test_u8, cache)
        report = {
            **info,
            "feature_space": judge.name,
            "num_real": int(len(real)),
            "reference": "test",
            "reference_cached": hit,
            **compare_features(real, judge(fake_u8), e, ctx.sample_key),
        }
        if y is not None:
            report["class_accuracy"] = float(np.mean(judge.predict(fake_u8) == y))
        if e.floor:
            train_u8 = load_split(self.config.data, "train")[0][: len(fake_u8)]
            train, _ = reference_features(judge, self.config.data, "train", train_u8, cache)
            floor = compare_features(real, train, e, ctx.sample_key)
            report.update({f"floor_{k}": v for k, v in floor.items()})
            report["floor_num_generated"] = int(len(train))
        return report
