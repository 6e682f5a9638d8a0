"""``clip_score``: how well samples drawn from prompts match them, in CLIP's space.

The task draws ``eval.num_samples`` images from its class prompts in turn
(``task.eval_samples``) and hands over its CLIPs (``task.encoder``, the one that
conditions, and ``task.independent_encoder`` from ``eval.clip_dir`` or None). Reported
(``clip_report``): the CLIP score of samples against their own prompts and against the
prompts shuffled among them, the same two of real test images against their true captions
(the scale of a good match and of none), and how often CLIP's zero-shot choice among the
class prompts is the class asked (samples) or the true class (real images). A model can
learn to please the CLIP that conditions it, so the independent CLIP's figures (``indep_*``)
and the judge's are the stricter tests.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from diffax_lab.data import load_split
from diffax_lab.errors import ConfigError
from diffax_lab.evaluators import Context, EvaluatorBase
from diffax_lab.metrics.clip_score import clip_score, cosine


def _sem(v: np.ndarray) -> float:
    """The standard error of the mean (0 for a single value)."""
    return float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0


def clip_report(prompt_emb, fake_emb, fake_y, real_emb, real_y, seed: int = 0) -> dict:
    """CLIP scores and zero-shot agreement of generated and real images.

    prompt_emb [K, D]: the class prompts' text embeddings; fake_emb [N, D] / real_emb [M, D]:
    image embeddings of samples (drawn for classes fake_y) and real images (of classes
    real_y). "Shuffled" pairs each image with the prompt of a random permutation of the
    images' classes. A score is torchmetrics' CLIP score of the set, max(100 mean cos, 0)
    (``metrics.clip_score.clip_score``), with the standard error of 100 cos over the images.
    """
    rng = np.random.default_rng(seed)
    prompt_emb, fake_y, real_y = np.asarray(prompt_emb), np.asarray(fake_y), np.asarray(real_y)

    def score(img, y):
        img, txt = jnp.asarray(img), jnp.asarray(prompt_emb[y])
        cos = 100.0 * np.asarray(cosine(img, txt))
        return float(clip_score(img, txt)), _sem(cos)

    def zero_shot(img):
        img = img / np.linalg.norm(img, axis=-1, keepdims=True)
        txt = prompt_emb / np.linalg.norm(prompt_emb, axis=-1, keepdims=True)
        return np.argmax(img @ txt.T, axis=-1)

    report = {}
    for name, emb, y in (("", fake_emb, fake_y), ("real_", real_emb, real_y)):
        emb = np.asarray(emb)
        for kind, yy in (("", y), ("_shuffled", y[rng.permutation(len(y))])):
            m, sem = score(emb, yy)
            report[f"{name}clip_score{kind}"] = m
            report[f"{name}clip_score{kind}_sem"] = sem
        report[f"{name}clip_accuracy"] = float(np.mean(zero_shot(emb) == y))
    report["num_real_clip"] = int(len(real_y))
    return report


class Evaluator(EvaluatorBase):
    def prepare(self):
        self.test_u8, self.test_y = load_split(self.config.data, "test")
        names = tuple(self.config.text.class_names)
        if int(self.test_y.max()) >= len(names):
            raise ConfigError(
                f"The test labels go up to {int(self.test_y.max())} but config.text.class_names "
                f"names {len(names)} classes; list one name per label."
            )

    def run(self, ctx: Context) -> dict:
        task, e = self.task, self.config.eval
        fake_u8, y, info = ctx.samples
        prompts = task.class_prompts()
        m = min(e.num_reference, len(self.test_u8))
        report = dict(info)
        for prefix, clip in (("", task.encoder), ("indep_", task.independent_encoder)):
            if clip is None:
                continue
            real_emb = task.image_embeddings(clip, self.test_u8, "test", self.workdir)[:m]
            r = clip_report(
                clip.embed_texts(prompts),
                clip.embed_images(fake_u8),
                y,
                real_emb,
                self.test_y[:m],
                seed=self.config.sample.seed,
            )
            report[f"{prefix}clip_dir"] = clip.clip_dir
            report.update({f"{prefix}{k}": v for k, v in r.items()})
        return report
