"""FID as pytorch-fid computes it: statistics of Inception pool3 features, reference
``.npz`` files, and the sample-size warning.

- ``fid_statistics(features)``: (mu, sigma) in float64 with numpy, as pytorch-fid's
  ``calculate_activation_statistics`` (``np.mean``, ``np.cov(rowvar=False)``), so numbers
  match its own to float64 rounding (``frechet.feature_statistics`` is the fast float32
  on-device version for other feature spaces).
- ``load_reference_statistics(path)`` / ``save_reference_statistics``: pytorch-fid's
  ``--save-stats`` format (``np.savez_compressed(mu=..., sigma=...)``; TTUR's
  ``fid_stats_*.npz`` use the same keys). Read without pickle.
- ``fid_from_features(features, mu_ref, sigma_ref)``: the Fréchet distance of
  ``frechet.py``, with a ``SmallSampleWarning`` below 10,000 samples: FID is biased upwards in 1/N
  (Chong & Forsyth 2020), so numbers from fewer samples are not comparable to papers.

Not for: the network (``models/inception.py``) or choosing a feature space.
"""

from __future__ import annotations

import warnings

import numpy as np

from diffax_lab.metrics.frechet import frechet_distance

MIN_FID_SAMPLES = 10_000


class SmallSampleWarning(UserWarning):
    """FID from fewer than ``MIN_FID_SAMPLES`` samples."""


def fid_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mu [F], sigma [F, F]) float64 of features [N >= 2, F], pytorch-fid's way."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, F], got shape {x.shape}.")
    return np.mean(x, axis=0), np.cov(x, rowvar=False)


def save_reference_statistics(path: str, mu, sigma) -> None:
    """Writes (mu, sigma) as pytorch-fid's ``--save-stats`` does."""
    np.savez_compressed(path, mu=np.asarray(mu), sigma=np.asarray(sigma))


def load_reference_statistics(path: str, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mu [F], sigma [F, F]) float64 from a pytorch-fid/TTUR ``.npz``; ``dim`` checks F."""
    with np.load(path, allow_pickle=False) as f:
        missing = [k for k in ("mu", "sigma") if k not in f.files]
        if missing:
            raise ValueError(
                f"{path}: no {missing} array (has {f.files}); FID reference statistics are "
                "pytorch-fid's `python -m pytorch_fid --save-stats DIR OUT.npz` output."
            )
        mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not [F] and [F, F].")
    if dim is not None and mu.shape[0] != dim:
        raise ValueError(
            f"{path}: statistics of {mu.shape[0]}-d features, the extractor gives {dim}-d."
        )
    return mu, sigma


def fid_from_features(features, mu_ref, sigma_ref, *, min_samples: int = MIN_FID_SAMPLES) -> float:
    """FID of generated ``features`` [N, F] against reference statistics (float64)."""
    n = int(np.shape(features)[0])
    if n < min_samples:
        warnings.warn(
            f"FID from {n} samples (< {min_samples}): it is biased upwards and not "
            "comparable to published FIDs (which use 50,000 or 10,000).",
            SmallSampleWarning,
            stacklevel=2,
        )
    mu, sigma = fid_statistics(features)
    return frechet_distance(mu, sigma, mu_ref, sigma_ref)
