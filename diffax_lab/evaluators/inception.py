"""``fid_inception``, ``kid_inception``: FID and KID in Inception space, the numbers papers
report (pytorch-fid's Inception-v3 pool3 features, ``models/inception.py``).

The weights are pytorch-fid's file converted once to safetensors
(``eval.inception_weights``; the conversion command is in the error when it is missing).
FID's reference statistics are a pytorch-fid ``.npz`` (``eval.fid_reference_stats``: mu,
sigma; e.g. CIFAR-10 train) or, when that is '', computed from ``eval.num_reference`` images
of the ``eval.fid_reference_split`` split. Real features are cached in
``<weights folder>/inception_cache/``, keyed by the dataset, split, image count, the images'
bytes and the weights' digest, so every run with the same weights reuses them. KID always
uses the split's features (a ``.npz`` holds no features).

Every report states n, the number of generated samples, and FID below 10,000 samples is
logged with a warning: FID is biased upwards in 1/n and is then not comparable to published
numbers (which use 50,000). ``fid_comparable`` says whether both hold: pytorch-fid's own
weights and n >= 10,000.
"""

from __future__ import annotations

import functools
import os
import warnings

from absl import logging

from diffax_lab import metrics
from diffax_lab.data import load_split
from diffax_lab.errors import ConfigError
from diffax_lab.evaluators import Context, EvaluatorBase
from diffax_lab.metrics import fid as fid_lib
from diffax_lab.metrics.features import reference_features
from diffax_lab.models.inception import FEATURE_DIM, FID_WEIGHTS_FILE, InceptionFeatures

CONVERT = (
    f"download pytorch-fid's {FID_WEIGHTS_FILE} (github.com/mseitzer/pytorch-fid, release "
    "fid_weights_0.3.0) and convert it once with `python -m diffax_lab.models.inception "
    f"--convert {FID_WEIGHTS_FILE} pt_inception-2015-12-05.safetensors`, then pass "
    "--config.eval.inception_weights=pt_inception-2015-12-05.safetensors"
)
SPLITS = ("train", "test")


@functools.lru_cache(maxsize=2)
def _extractor(path: str, batch_size: int, mtime_ns: int) -> InceptionFeatures:
    """One loaded (and, after its first batch, compiled) network per weights file and batch
    size in a process: evaluations during training and repeated evaluations reuse it."""
    del mtime_ns  # part of the key only: a rewritten file loads anew
    return InceptionFeatures(path, batch_size=batch_size)


class Evaluator(EvaluatorBase):
    during_training = True

    def prepare(self):
        e = self.config.eval
        field = "config.eval.inception_weights"
        path = e.get("inception_weights", "")
        if not path:
            raise ConfigError(
                f"{field} is empty: FID in Inception space needs the weights; {CONVERT}."
            )
        if not os.path.isfile(path):
            raise ConfigError(f"{field}={path!r} does not exist; {CONVERT}.")
        if e.fid_reference_split not in SPLITS:
            raise ConfigError(
                f"config.eval.fid_reference_split={e.fid_reference_split!r} must be one of "
                f"{list(SPLITS)}."
            )
        try:
            self.extractor = _extractor(
                os.path.abspath(path), e.inception_batch_size, os.stat(path).st_mtime_ns
            )
        except (ValueError, OSError) as err:
            raise ConfigError(f"{field}={path!r}: {err}") from None
        self.cache_dir = os.path.join(os.path.dirname(os.path.abspath(path)), "inception_cache")
        self.ref_stats = None
        stats = e.get("fid_reference_stats", "")
        if stats:
            field = "config.eval.fid_reference_stats"
            if not os.path.isfile(stats):
                raise ConfigError(
                    f"{field}={stats!r} does not exist: give pytorch-fid's `--save-stats` .npz "
                    "(mu, sigma), or '' to compute the statistics from the data."
                )
            try:
                self.ref_stats = fid_lib.load_reference_statistics(stats, dim=FEATURE_DIM)
            except (ValueError, OSError) as err:
                raise ConfigError(f"{field}={stats!r}: {err}") from None
        if not self.extractor.is_pytorch_fid_weights:
            logging.warning(
                "%s was not converted from pytorch-fid's %s: its FID is not comparable to "
                "published numbers.",
                path,
                FID_WEIGHTS_FILE,
            )

    def _real_features(self):
        e = self.config.eval
        split = e.fid_reference_split
        real_u8 = load_split(self.config.data, split)[0][: e.num_reference]
        feats, hit = reference_features(
            self.extractor, self.config.data, split, real_u8, self.cache_dir, prefix="inception"
        )
        return feats, f"{self.config.data.name} {split} split, {len(feats)} images", hit

    def run(self, ctx: Context) -> dict:
        e = self.config.eval
        fake_u8, _, info = ctx.samples
        n = int(len(fake_u8))
        fake = self.extractor(fake_u8)
        report = {**info, "inception_weights": self.extractor.name, "num_samples": n}
        real = None
        if "kid_inception" in self.metrics or self.ref_stats is None:
            real, ref_name, hit = self._real_features()
            report["inception_reference_cached"] = hit
        if "fid_inception" in self.metrics:
            if self.ref_stats is not None:
                mu, sigma = self.ref_stats
                fid_ref = f"statistics {e.fid_reference_stats}"
            else:
                mu, sigma = fid_lib.fid_statistics(real)
                fid_ref = ref_name
            with warnings.catch_warnings():  # said once below, in the log line
                warnings.simplefilter("ignore", fid_lib.SmallSampleWarning)
                fid = fid_lib.fid_from_features(fake, mu, sigma)
            comparable = self.extractor.is_pytorch_fid_weights and n >= fid_lib.MIN_FID_SAMPLES
            line = f"FID {fid:.3f} (Inception pool3, n={n} samples vs {fid_ref})"
            report.update(
                fid_inception=fid,
                fid_reference=fid_ref,
                fid_comparable=bool(comparable),
                fid_line=line,
            )
            if n < fid_lib.MIN_FID_SAMPLES:
                logging.warning(
                    "%s: n=%d < %d samples, so FID is biased upwards and not comparable to "
                    "published FIDs (50,000 samples); raise eval.num_samples.",
                    line,
                    n,
                    fid_lib.MIN_FID_SAMPLES,
                )
            else:
                logging.info("%s", line)
        if "kid_inception" in self.metrics:
            kid, kid_std = metrics.kernel_distance(
                real,
                fake,
                ctx.sample_key,
                num_subsets=e.kid_num_subsets,
                subset_size=e.kid_subset_size,
            )
            report.update(kid_inception=kid, kid_inception_std=kid_std)
            logging.info(
                "KID %.5f +- %.5f (Inception pool3, n=%d samples vs %s)", kid, kid_std, n, ref_name
            )
        return report
