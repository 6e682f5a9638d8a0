"""Sample-quality and likelihood metrics, in JAX (pure functions of features or a model_fn).

- ``frechet``: feature statistics and the Fréchet distance (FID's formula in any feature space);
- ``fid``: FID as pytorch-fid computes it (float64 statistics, its reference ``.npz``
  files, a warning below 10,000 samples); the Inception network is ``models/inception.py``;
- ``kid``: kernel distance, the unbiased polynomial-kernel MMD^2 over subsets;
- ``precision_recall``: improved precision and recall (Kynkäänniemi et al. 2019);
- ``likelihood``: bits/dim from DDPM's discrete-time variational bound;
- ``ode_likelihood``: exact log-likelihood and bits/dim through the probability-flow ODE
  (Hutchinson-Skilling trace estimates, uniform dequantization);
- ``features``: the feature-extractor interface (extractors are handed in) and the cache
  of reference features of real data.
"""

from diffax_lab.metrics.fid import fid_from_features, fid_statistics, load_reference_statistics
from diffax_lab.metrics.frechet import feature_statistics, frechet_distance
from diffax_lab.metrics.kid import kernel_distance
from diffax_lab.metrics.likelihood import bits_per_dim, vlb_terms
from diffax_lab.metrics.ode_likelihood import ode_bits_per_dim, ode_log_likelihood
from diffax_lab.metrics.precision_recall import precision_recall

__all__ = [
    "bits_per_dim",
    "feature_statistics",
    "fid_from_features",
    "fid_statistics",
    "frechet_distance",
    "kernel_distance",
    "load_reference_statistics",
    "ode_bits_per_dim",
    "ode_log_likelihood",
    "precision_recall",
    "vlb_terms",
]
