"""Transferability scores from the cache: how well a stored feature should transfer to a
dataset's labels, in seconds, without training a probe. Each is a plug-in: a function of
(features, labels) in its own module and one `TransferScore` line in `SCORES`.

    logme.py   LogME (You et al. 2021): a Bayesian linear model's evidence per sample
    hscore.py  H-score (Bao et al. 2019): the class means' share of the feature variance

Large studies find that the winning score changes with the setting, and that plain kNN or the
parameter count often ranks backbones as well: every result carries the parameter count beside
the scores (`params`), a baseline to read them against, never a score to use alone.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import numpy as np

from probekit.errors import OptionError, close_matches

__all__ = ["SCORES", "TransferResult", "TransferScore", "transferability"]


@dataclass(frozen=True)
class TransferScore:
    """One score: its name (the record's method and metric), what it is, and its function
    (`module:function`, (features (n, D), labels (n,)) -> float, higher better)."""

    name: str
    summary: str
    function: str

    def load(self) -> Callable[[np.ndarray, np.ndarray], float]:
        module, _, fn = self.function.partition(":")
        out: Callable[[np.ndarray, np.ndarray], float] = getattr(
            importlib.import_module(module), fn
        )
        return out


_T = "probekit.transferability"
SCORES: dict[str, TransferScore] = {
    s.name: s
    for s in (
        TransferScore(
            "logme",
            "LogME: a Bayesian linear model's log evidence of each one-hot target, per sample",
            f"{_T}.logme:logme",
        ),
        TransferScore(
            "hscore",
            "H-score: tr(cov(f)^+ cov(E[f|y])), the class means' share",
            f"{_T}.hscore:hscore",
        ),
    )
}


@dataclass(frozen=True)
class TransferResult:
    """Per feature, each score; the backbone's parameter count; the records."""

    rows: dict[str, dict[str, float]]
    params: int
    records: list[Any]


def transferability(
    source: Any,
    *,
    scores: str | Sequence[str] = ("logme", "hscore"),
    split: str = "train",
    features: Sequence[str] | None = None,
) -> TransferResult:
    """Each of `scores` (`SCORES`) of every stored feature (or `features`) on `split`'s usable
    rows (train: the labels a probe would be fit on), and the backbone's parameter count;
    records of kind `structure`, method and metric the score's name (`params` for the count)."""
    from probekit.cache.store import open_for_reading
    from probekit.records import Metric, Record
    from probekit.specs import parse_list

    names = parse_list(scores, "scores") if isinstance(scores, str) else list(scores)
    for name in names:
        if name not in SCORES:
            raise OptionError(
                f"unknown transferability score {name!r}: use {', '.join(SCORES)}."
                + close_matches(name, list(SCORES))
            )
    store = open_for_reading(source)
    if split not in store.splits:
        raise OptionError(
            f"{store.path.name} has no {split!r} split (it has {', '.join(store.splits)})."
        )
    rows = np.flatnonzero(store.usable(split))
    labels = store.labels(split)[rows]
    if len(np.unique(labels)) < 2:
        raise OptionError(f"split {split!r} of {store.path.name} holds fewer than two classes.")
    info = store.info
    base = Record(
        "structure", info.label, info.dataset.spec, split=split, n=len(rows),
        backbone=info.backbone.name, weights=info.weights_source,
    )  # fmt: skip
    out: dict[str, dict[str, float]] = {}
    records = []
    for feature in store.check_features(list(features)) if features else store.feature_names:
        x = np.asarray(store.read_rows(split, feature, rows), dtype=np.float64)
        out[feature] = {name: SCORES[name].load()(x, labels) for name in names}
        records += [
            replace(base, feature=feature, method=name, metric=cast(Metric, name), value=v)
            for name, v in out[feature].items()
        ]
    params = int(info.backbone.params)
    records.append(replace(base, method="params", metric="params", value=float(params)))
    return TransferResult(out, params, records)
