"""Classification and retrieval metrics: top-k, balanced and per-class accuracy, mAP, MRR."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np

__all__ = [
    "ECE_BINS",
    "RetrievalMetrics",
    "balanced_accuracy",
    "bootstrap_ci",
    "decode_outcomes",
    "encode_outcomes",
    "expected_calibration_error",
    "fit_temperature",
    "mcnemar_p",
    "paired_bootstrap_ci",
    "per_class_accuracy",
    "reliability_bins",
    "retrieval_metrics",
    "topk_accuracy",
]


def topk_accuracy(ranked: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among the first k columns of `ranked` (Q, >=k)."""
    if len(labels) == 0:
        return float("nan")
    return float((ranked[:, :k] == labels[:, None]).any(axis=1).mean())


def per_class_accuracy(pred: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Recall of each class (NaN for classes absent from `labels`)."""
    total = np.bincount(labels, minlength=n_classes).astype(np.float64)
    hits = np.bincount(labels[pred == labels], minlength=n_classes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, hits / np.maximum(total, 1), np.nan)


def balanced_accuracy(pred: np.ndarray, labels: np.ndarray, n_classes: int) -> float:
    """Mean per-class recall over the classes present in `labels` (scikit-learn's definition)."""
    per_class = per_class_accuracy(pred, labels, n_classes)
    return float(np.nanmean(per_class)) if np.isfinite(per_class).any() else float("nan")


def bootstrap_ci(
    correct: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the accuracy of a 0/1 vector.

    Resampling n items of a 0/1 vector with replacement gives Binomial(n, mean) hits, so the
    bootstrap draws the hit counts directly: the same distribution at O(n_boot) cost.
    """
    n = len(correct)
    if n == 0:
        return float("nan"), float("nan")
    p = float(np.mean(correct))
    means = np.random.default_rng(seed).binomial(n, p, size=n_boot) / n
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def paired_bootstrap_ci(
    a: np.ndarray, b: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(a) - mean(b) for two 0/1 vectors on the same items
    (two models' hits on one test set), the items resampled together.

    Each item's difference is +1, -1 or 0, so resampling n items with replacement draws those
    three counts from Multinomial(n, their shares): the same distribution at O(n_boot) cost.
    """
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired vectors differ in shape: {a.shape} vs {b.shape}")
    n = len(a)
    if n == 0:
        return float("nan"), float("nan")
    up, down = int((a & ~b).sum()), int((~a & b).sum())
    counts = np.random.default_rng(seed).multinomial(
        n, [up / n, down / n, (n - up - down) / n], n_boot
    )
    diffs = (counts[:, 0] - counts[:, 1]) / n
    lo, hi = np.quantile(diffs, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def mcnemar_p(a: np.ndarray, b: np.ndarray) -> float:
    """Exact two-sided McNemar test of two classifiers' hits on the same items: the p-value of
    the images only one of them got right splitting as they did, were each way equally likely
    (a binomial test; exact, so sound with few disagreements)."""
    from scipy.stats import binomtest

    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired vectors differ in shape: {a.shape} vs {b.shape}")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def encode_outcomes(
    scored: np.ndarray, right: np.ndarray, fingerprint: str | None = None
) -> dict[str, Any]:
    """Which rows of a split were scored (`scored`, one flag per row) and which of those were
    classified right (`right`, one flag per scored row), as JSON: bit-packed, base64.
    `fingerprint` names the rows (the dataset's), so only outcomes on the same rows pair up."""
    scored = np.asarray(scored, dtype=bool)
    full = np.zeros(len(scored), dtype=bool)
    full[scored] = np.asarray(right, dtype=bool)

    def pack(bits: np.ndarray) -> str:
        return base64.b64encode(np.packbits(bits).tobytes()).decode("ascii")

    return {
        "rows": len(scored),
        "scored": pack(scored),
        "right": pack(full),
        "fingerprint": fingerprint,
    }


def decode_outcomes(d: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(scored, right), one flag per row of the split each: the inverse of `encode_outcomes`."""
    n = int(d["rows"])

    def unpack(text: str) -> np.ndarray:
        raw = np.frombuffer(base64.b64decode(text), dtype=np.uint8)
        return np.unpackbits(raw, count=n).astype(bool)

    return unpack(d["scored"]), unpack(d["right"])


@dataclass(frozen=True)
class RetrievalMetrics:
    """Sums over queries with at least one relevant gallery item; divide by `n` for means."""

    ap: float
    ap_at_r: float
    rr: float
    precision_at: dict[int, float]
    recall_at: dict[int, float]
    n: int


@numba.njit(cache=True)
def _rank_metrics(
    relevant: np.ndarray, n_relevant: np.ndarray, ks: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-query AP, AP@R, reciprocal rank, precision@k, recall@k from ranked relevance."""
    q, n = relevant.shape
    ap, ap_r, rr = np.zeros(q), np.zeros(q), np.zeros(q)
    prec, rec = np.zeros((q, len(ks))), np.zeros((q, len(ks)))
    for i in range(q):
        r = n_relevant[i]
        if r == 0:
            continue
        hits = 0
        for j in range(n):
            if relevant[i, j]:
                hits += 1
                p = hits / (j + 1)
                ap[i] += p
                if j < r:
                    ap_r[i] += p
                if hits == 1:
                    rr[i] = 1.0 / (j + 1)
            for t in range(len(ks)):
                if j + 1 == ks[t]:
                    prec[i, t] = hits / ks[t]
                    rec[i, t] = hits / r
        ap[i] /= r
        ap_r[i] /= r
        for t in range(len(ks)):
            if ks[t] > n:  # fewer gallery items than k: all of them are retrieved
                prec[i, t] = hits / ks[t]
                rec[i, t] = hits / r
    return ap, ap_r, rr, prec, rec


def retrieval_metrics(
    order: np.ndarray,
    gallery_labels: np.ndarray,
    query_labels: np.ndarray,
    ks: tuple[int, ...],
    queries_in_gallery: bool = False,
) -> RetrievalMetrics:
    """Metrics of full rankings `order` (Q, N') of gallery indices, best first.

    Relevant = same label. With `queries_in_gallery` each query is a gallery item left out of
    its own ranking, and so of its relevant count. Queries without any relevant gallery item
    are left out (n).
    """
    relevant = gallery_labels[order] == query_labels[:, None]
    counts = np.bincount(gallery_labels, minlength=int(query_labels.max(initial=0)) + 1)
    n_relevant = counts[query_labels] - int(queries_in_gallery)
    ks_arr = np.array(sorted(ks), dtype=np.int64)
    ap, ap_r, rr, prec, rec = _rank_metrics(relevant, n_relevant.astype(np.int64), ks_arr)
    keep = n_relevant > 0
    return RetrievalMetrics(
        ap=float(ap[keep].sum()),
        ap_at_r=float(ap_r[keep].sum()),
        rr=float(rr[keep].sum()),
        precision_at={int(k): float(prec[keep, t].sum()) for t, k in enumerate(ks_arr)},
        recall_at={int(k): float(rec[keep, t].sum()) for t, k in enumerate(ks_arr)},
        n=int(keep.sum()),
    )


# --------------------------------------------------------------------------- calibration

ECE_BINS = 15


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(1, keepdims=True)
    return out


def reliability_bins(
    logits: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean confidence, accuracy, count) of each of `bins` equal-width bins of the top-class
    probability over (0, 1] (a bin with no rows: confidence and accuracy NaN)."""
    p = _softmax(logits)
    conf, pred = p.max(1), p.argmax(1)
    which = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)  # (lo, hi] bins
    count = np.bincount(which, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, conf, minlength=bins) / count
        acc = np.bincount(which, (pred == labels).astype(np.float64), minlength=bins) / count
    return mean_conf, acc, count


def expected_calibration_error(
    logits: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> float:
    """ECE: the rows' share-weighted gap between accuracy and mean top-class probability,
    over `bins` equal-width confidence bins (Guo et al. 2017)."""
    conf, acc, count = reliability_bins(logits, labels, bins)
    seen = count > 0
    return float((count[seen] * np.abs(acc[seen] - conf[seen])).sum() / max(count.sum(), 1))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T > 0 that minimizes the mean cross-entropy of softmax(logits / T)
    (temperature scaling, Guo et al. 2017), searched over log T in [-5, 5]."""
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels)

    def nll(log_t: float) -> float:
        s = z / np.exp(log_t)
        s = s - s.max(1, keepdims=True)
        return float((np.log(np.exp(s).sum(1)) - s[np.arange(len(y)), y]).mean())

    res = minimize_scalar(nll, bounds=(-5.0, 5.0), method="bounded", options={"xatol": 1e-6})
    return float(np.exp(res.x))
