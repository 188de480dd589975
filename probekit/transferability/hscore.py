"""H-score (Bao et al., ICIP 2019): how much of the features' variance the class means explain,

    H(f) = tr( cov(f)^+ cov(E[f | y]) )

with both covariances over the samples (f centred; E[f | y] each sample's class mean, so that
cov(E[f | y]) is the between-class scatter over n) and `^+` the pseudo-inverse (features of
more dimensions than samples, or collinear ones, have a singular covariance). H lies in [0, C - 1]
for C classes and does not change under an invertible linear map of the features.
"""

from __future__ import annotations

import numpy as np

__all__ = ["hscore"]


def hscore(features: np.ndarray, labels: np.ndarray) -> float:
    f = np.asarray(features, dtype=np.float64)
    f = f - f.mean(0)
    n = len(f)
    cov_f = f.T @ f / n
    means = np.zeros_like(f)
    for k in np.unique(labels):
        at = labels == k
        means[at] = f[at].mean(0)
    cov_g = means.T @ means / n
    return float(np.trace(np.linalg.pinv(cov_f, rcond=1e-10, hermitian=True) @ cov_g))
