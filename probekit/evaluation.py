"""The one evaluator of classifiers, shared by kNN and every probe method: ranked predictions
and labels in, the metric records out (top-1 with its bootstrap interval, top-5, balanced and
worst-class accuracy)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from probekit.errors import ProbekitError, ProbekitWarning
from probekit.metrics import (
    balanced_accuracy,
    bootstrap_ci,
    encode_outcomes,
    per_class_accuracy,
    topk_accuracy,
)
from probekit.records import Record

__all__ = ["check_labels", "classification_records", "warned", "with_extra"]


def warned(base: Record, said: Sequence[str], where: str) -> Record:
    """Each of `said` as a warning now, and in every record made from `base` (the report says
    them again beside the dataset)."""
    for text in said:
        warnings.warn(f"{where}: {text}", ProbekitWarning, stacklevel=3)
    if not said:
        return base
    return with_extra(base, warnings=[*base.extra.get("warnings", ()), *said])


def check_labels(
    train: np.ndarray,
    test: np.ndarray,
    class_names: Sequence[str],
    *,
    who: str,
    splits: tuple[str, str] = ("train", "test"),
) -> list[str]:
    """A classifier fit on labels `train` and scored on `test`: fewer than two train classes is
    a one-line error (every score would be 100%); test classes without a train image (never
    predicted: they cap the score) are returned as a warning, with counts."""
    fit, scored = splits
    have = np.unique(train)
    if len(have) < 2:
        named = f": {class_names[int(have[0])]!r}" if len(have) == 1 and class_names else ""
        raise ProbekitError(
            f"the {fit} split has fewer than 2 classes ({len(have)}{named}); {who} needs at "
            "least 2 to give a number that means anything."
        )
    absent = np.setdiff1d(np.unique(test), have)
    if not len(absent):
        return []
    n = int(np.isin(test, absent).sum())
    names = ", ".join(repr(class_names[int(c)]) for c in absent[:5] if int(c) < len(class_names))
    more = f" and {len(absent) - 5} more" if len(absent) > 5 else ""
    return [
        f"{len(absent)} {scored} classes have no {fit} images ({names}{more}): their {n} "
        f"{scored} images can never be predicted, top-1 is at most {1 - n / len(test):.1%}"
    ]


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
    extra: dict[str, Any] = {
        **base.extra,
        "ci95": list(bootstrap_ci(correct.astype(np.float64), seed=seed)),
    }
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
            extra={
                **base.extra,
                "per_class": [None if np.isnan(a) else float(a) for a in per_class],
            },
        ),
    ]
    return records, correct


def with_extra(record: Record, **extra: Any) -> Record:
    """`record` with `extra` added to its extra fields."""
    return replace(record, extra={**record.extra, **extra})
