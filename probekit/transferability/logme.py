"""LogME (You et al., ICML 2021): how well a Bayesian linear model of the features explains the
labels, without training one.

For each class k, the one-hot target y (n,) is regressed on the raw features F (n, D) with a
Gaussian prior on the weights, w ~ N(0, alpha^-1 I), and Gaussian noise of precision beta. The
evidence is the log marginal likelihood of y, maximized over alpha and beta:

    log p(y | F, alpha, beta) = D/2 log alpha + n/2 log beta - n/2 log 2pi
        - beta/2 ||F m - y||^2 - alpha/2 m^T m - 1/2 log det(alpha I + beta F^T F)

with m = beta (alpha I + beta F^T F)^-1 F^T y, the posterior mean. alpha and beta come from
MacKay's fixed point (gamma = sum_i beta s_i / (alpha + beta s_i) over the eigenvalues s_i of
F^T F; alpha = gamma / m^T m; beta = (n - gamma) / ||F m - y||^2), computed in the basis of
F's singular vectors. LogME is the evidence divided by n, averaged over the classes.

This is the quantity scikit-learn's `BayesianRidge(compute_score=True)` reports as its log
marginal likelihood with its four hyperpriors at 0 and no intercept (its `alpha_` is beta here,
its `lambda_` is alpha): the tests compare the two. probekit iterates to convergence (relative
change of alpha / beta under 1e-10) where the reference code stops after 11 iterations.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["class_evidence", "logme"]

MAX_ITER, TOL = 1000, 1e-10


def _fixed_point(s: np.ndarray, x2: np.ndarray, outside: float, n: int, d: int) -> float:
    """The evidence of one target at MacKay's fixed point: `s` (r,) the nonzero eigenvalues
    of F^T F, `x2` (r,) the squared projections of y on F's left singular vectors, `outside`
    the part of ||y||^2 outside F's column space."""
    alpha, beta = 1.0, 1.0
    for _ in range(MAX_ITER):
        t = alpha / beta
        gamma = float(np.sum(s / (s + t)))
        m2 = float(np.sum(s * x2 / (s + t) ** 2))
        res2 = float(np.sum(x2 * (t / (s + t)) ** 2)) + outside
        alpha, beta = gamma / max(m2, 1e-300), (n - gamma) / max(res2, 1e-300)
        if abs(alpha / beta - t) <= TOL * t:
            break
    t = alpha / beta
    m2 = float(np.sum(s * x2 / (s + t) ** 2))
    res2 = float(np.sum(x2 * (t / (s + t)) ** 2)) + outside
    logdet = float(np.sum(np.log(alpha + beta * s))) + (d - len(s)) * math.log(alpha)
    return (
        d / 2 * math.log(alpha)
        + n / 2 * math.log(beta)
        - n / 2 * math.log(2 * math.pi)
        - beta / 2 * res2
        - alpha / 2 * m2
        - logdet / 2
    )


def class_evidence(features: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    """Each present class's evidence per sample (evidence / n) of its one-hot target."""
    f = np.asarray(features, dtype=np.float64)
    n, d = f.shape
    u, sv, _ = np.linalg.svd(f, full_matrices=False)
    keep = sv > sv.max(initial=0.0) * max(n, d) * np.finfo(np.float64).eps
    u, s = u[:, keep], sv[keep] ** 2
    out = {}
    for k in np.unique(labels):
        y = (labels == k).astype(np.float64)
        x = u.T @ y
        outside = max(float(y @ y - x @ x), 0.0)
        out[int(k)] = _fixed_point(s, x * x, outside, n, d) / n
    return out


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    """LogME of features (n, D) for integer labels (n,): the mean over the present classes of
    each one-hot target's evidence per sample (higher: the features explain the labels
    better)."""
    per_class = class_evidence(features, labels)
    return float(np.mean(list(per_class.values())))
