"""The Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017):

    FD = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)).

The statistics are computed in JAX (on the device, in float32 with centred features); the
final F x F matrix square root runs on the host in float64, as every reference
implementation does (pytorch-fid uses scipy's sqrtm in float64): it is O(F^3) on a small
matrix, and float32 there loses the digits that separate good models. The trace of
(S_1 S_2)^(1/2) is taken as the sum of the square roots of the eigenvalues of the
symmetric matrix S_1^(1/2) S_2 S_1^(1/2), which has the same spectrum and is stable.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


@jax.jit
def _mean_cov(x):
    mu = jnp.mean(x, axis=0)
    xc = x - mu
    return mu, xc.T @ xc / (x.shape[0] - 1)


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean [F], covariance [F, F]) of features [N, F] (N >= 2), as float64 numpy."""
    features = jnp.asarray(features, jnp.float32)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, F], got shape {features.shape}.")
    mu, cov = _mean_cov(features)
    return np.asarray(mu, np.float64), np.asarray(cov, np.float64)


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """FD between N(mu1, sigma1) and N(mu2, sigma2), in float64."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(
            f"Statistics disagree in shape: mu {mu1.shape} vs {mu2.shape}, "
            f"sigma {s1.shape} vs {s2.shape}."
        )
    r1 = _sqrt_psd(s1)
    eig = np.linalg.eigvalsh(r1 @ s2 @ r1)
    tr_sqrt = np.sum(np.sqrt(np.clip(eig, 0, None)))
    fd = np.sum(np.square(mu1 - mu2)) + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt
    return float(max(fd, 0.0))
