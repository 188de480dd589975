"""The one evaluator of classifiers, shared by kNN and every probe method: ranked predictions
and labels in, the metric records out (top-1 with its bootstrap interval, top-5, balanced and
worst-class accuracy)."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np

from probekit.metrics import (
    balanced_accuracy,
    bootstrap_ci,
    encode_outcomes,
    per_class_accuracy,
    topk_accuracy,
)
from probekit.records import Record

__all__ = ["classification_records", "with_extra"]


def classification_records(
    ranked: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    base: Record,
    *,
    top: int = 5,
    seed: int = 0,
    scored: np.ndarray | None = None,
    fingerprint: str | None = None,
) -> tuple[list[Record], np.ndarray]:
    """The records of one classifier on one split, and which rows it got right.

    ranked: (Q, >= top) classes, best first; labels: (Q,). `base` holds what the records share
    (kind, model, dataset, split, feature, method, hyper); `top`: how many ranked classes the
    `top5` record counts (fewer where fewer neighbours vote).
    `scored` (one flag per row of the split: the Q rows scored) adds the per-image outcomes to
    the top-1 record, for paired comparisons between models on the same rows.
    """
    correct = ranked[:, 0] == labels
    top1 = float(correct.mean()) if len(labels) else math.nan
    extra: dict[str, Any] = {"ci95": list(bootstrap_ci(correct.astype(np.float64), seed=seed))}
    if scored is not None:
        extra["outcomes"] = encode_outcomes(scored, correct, fingerprint)
    per_class = per_class_accuracy(ranked[:, 0], labels, n_classes)
    present = per_class[np.isfinite(per_class)]
    at = replace(base, n=len(labels))
    records = [
        replace(at, metric="top1", value=top1, extra=extra),
        replace(at, metric="top5", value=topk_accuracy(ranked, labels, top)),
        replace(
            at, metric="balanced_accuracy", value=balanced_accuracy(ranked[:, 0], labels, n_classes)
        ),
        replace(
            at,
            metric="worst_class_accuracy",
            value=float(present.min()) if len(present) else math.nan,
            extra={"per_class": [None if np.isnan(a) else float(a) for a in per_class]},
        ),
    ]
    return records, correct


def with_extra(record: Record, **extra: Any) -> Record:
    """`record` with `extra` added to its extra fields."""
    return replace(record, extra={**record.extra, **extra})
