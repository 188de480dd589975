"""What a stored feature says without a trained probe: RankMe (the effective rank of the
embeddings, Garrido et al. 2023: label-free) and how well k-means clusters recover the
classes (NMI and ARI against the labels, clusters by FAISS k-means on L2-normalized rows)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Any, cast

import numpy as np

from probekit.cache.store import FeatureStore, open_for_reading
from probekit.errors import OptionError, ProbekitError
from probekit.records import Metric, Record

__all__ = ["StructureResult", "kmeans_clusters", "rankme", "structure"]

RANKME_EPS = 1e-7  # the paper's epsilon, added to each normalized singular value


def rankme(x: np.ndarray, eps: float = RANKME_EPS) -> float:
    """exp(entropy) of the normalized singular values of the (n, d) embeddings: between 1 (all
    rows on one line) and min(n, d) (every direction used alike)."""
    x = np.asarray(x, dtype=np.float64)
    if x.shape[0] > x.shape[1]:  # the singular values are the roots of X^T X's eigenvalues
        sigma = np.sqrt(np.clip(np.linalg.eigvalsh(x.T @ x), 0, None))
    else:
        sigma = np.linalg.svd(x, compute_uv=False)
    total = sigma.sum()
    if total <= 0:
        return math.nan
    p = sigma / total + eps
    return float(np.exp(-(p * np.log(p)).sum()))


def kmeans_clusters(x: np.ndarray, n_clusters: int, seed: int = 0) -> np.ndarray:
    """(n,) cluster of each row: FAISS k-means (20 iterations, 3 restarts) on L2-normalized
    rows (the cosine geometry kNN uses)."""
    import faiss

    from probekit.neighbors.search import l2_normalize

    z = l2_normalize(x)
    if n_clusters > len(z):
        raise ProbekitError(f"k-means with {n_clusters} clusters needs as many rows; got {len(z)}.")
    # min_points_per_centroid 1: a small test split is clustered as it is, without a warning
    km = faiss.Kmeans(
        z.shape[1], n_clusters, niter=20, nredo=3, seed=seed, min_points_per_centroid=1
    )
    km.train(z)
    _, assign = km.index.search(z, 1)
    return assign[:, 0].astype(np.int64)


@dataclass(frozen=True)
class StructureResult:
    """Per feature: RankMe, and NMI and ARI of k-means clusters (as many as classes)."""

    rows: dict[str, dict[str, float]]  # feature -> {"rankme", "nmi", "ari"}
    records: list[Record]


def structure(
    source: FeatureStore | str | os.PathLike[str],
    *,
    split: str = "test",
    features: list[str] | None = None,
    seed: int = 0,
) -> StructureResult:
    """RankMe, k-means NMI and ARI of every stored feature (or `features`) on `split`'s valid
    rows; records of kind `structure`, one per metric and feature."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    store = open_for_reading(source)
    if split not in store.splits:
        raise OptionError(
            f"{store.path.name} has no {split!r} split (it has {', '.join(store.splits)})."
        )
    rows_ok = np.flatnonzero(store.usable(split))
    labels = store.labels(split)[rows_ok]
    n_classes = len(np.unique(labels))
    info = store.info
    base = Record(
        "structure",
        info.label,
        info.dataset.spec,
        split=split,
        method="structure",
        n=len(rows_ok),
        backbone=info.backbone.name,
        weights=info.weights_source,
    )
    out: dict[str, dict[str, float]] = {}
    records = []
    for name in store.check_features(features) if features else store.feature_names:
        x = np.asarray(store.read_rows(split, name, rows_ok), np.float32)
        clusters = kmeans_clusters(x, n_classes, seed)
        values = {
            "rankme": rankme(x),
            "nmi": float(normalized_mutual_info_score(labels, clusters)),
            "ari": float(adjusted_rand_score(labels, clusters)),
        }
        out[name] = values
        hyper: dict[str, Any] = {"clusters": n_classes, "seed": seed}
        records += [
            replace(base, feature=name, metric=cast(Metric, m), value=v, hyper=hyper)
            for m, v in values.items()
        ]
    return StructureResult(out, records)
