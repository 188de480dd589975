"""How far the proxies agree: per task, the rank correlation (Spearman and Kendall) between
the backbone rankings of every pair of methods, with a bootstrap interval over the test
images (every entry's per-image outcomes resampled together), and a flag where one method
scores a backbone far below another (kNN underrating a masked-image model, say).

Computed from leaderboard cells only (`compute.Cell`): reports of any runs combine.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from probekit.methods import all_methods
from probekit.metrics import decode_outcomes

__all__ = [
    "AGREEMENT_NOTE",
    "FLAG_POINTS",
    "Agreement",
    "Flag",
    "agreement",
    "gap_flags",
    "rank_correlations",
]

FLAG_POINTS = 20.0  # a method this many points of top-1 below another on one backbone
BOOTSTRAP = 1000
AGREEMENT_NOTE = (
    "Spearman / Kendall: how alike two methods rank the backbones on a task (1: the same order, "
    "-1: reversed, 0: unrelated); the interval resamples the test images. Below 1, which "
    "backbone wins depends on the proxy: read the probes before kNN."
)


@dataclass(frozen=True)
class Agreement:
    """Two methods' rankings of the same backbones on one task."""

    task: str
    method_a: str
    method_b: str
    models: tuple[str, ...]
    spearman: float
    kendall: float
    spearman_ci95: tuple[float, float] | None
    kendall_ci95: tuple[float, float] | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "method_a": self.method_a,
            "method_b": self.method_b,
            "models": list(self.models),
            "spearman": self.spearman,
            "kendall": self.kendall,
            "spearman_ci95": None if self.spearman_ci95 is None else list(self.spearman_ci95),
            "kendall_ci95": None if self.kendall_ci95 is None else list(self.kendall_ci95),
        }


@dataclass(frozen=True)
class Flag:
    """One backbone that one method scores far below another on one task."""

    task: str
    model: str
    low: str
    high: str
    low_value: float
    high_value: float

    def text(self) -> str:
        gap = 100 * (self.high_value - self.low_value)
        return (
            f"{self.model} on {self.task}: {self.low} {100 * self.low_value:.1f} vs {self.high} "
            f"{100 * self.high_value:.1f} ({gap:.0f} points): {self.low} underrates this model; "
            f"trust {self.high}."
        )


def rank_correlations(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Spearman's rho and Kendall's tau-b of each row pair of (R, m) scores a and b (ties
    share their average rank, as scipy counts them); NaN where a row is constant."""
    from scipy.stats import rankdata

    a, b = np.atleast_2d(a).astype(np.float64), np.atleast_2d(b).astype(np.float64)
    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (ra * rb).sum(1) / np.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
    iu = np.triu_indices(a.shape[1], 1)
    sa = np.sign(a[:, :, None] - a[:, None, :])[:, iu[0], iu[1]]  # (R, pairs)
    sb = np.sign(b[:, :, None] - b[:, None, :])[:, iu[0], iu[1]]
    with np.errstate(invalid="ignore", divide="ignore"):
        tau = (sa * sb).sum(1) / np.sqrt((sa != 0).sum(1) * (sb != 0).sum(1))
    return rho, tau


def _hits(cells: Sequence[Any]) -> np.ndarray | None:
    """(models, images) right/wrong of each cell on the test rows all of them scored, or None
    where some cell has no outcomes of the same rows."""
    outs = [c.outcomes for c in cells]
    if any(not o or o.get("fingerprint") is None for o in outs):
        return None
    if len({(o["rows"], o["fingerprint"]) for o in outs}) != 1:
        return None
    decoded = [decode_outcomes(o) for o in outs]
    both = np.logical_and.reduce([s for s, _ in decoded])
    if not both.any():
        return None
    return np.stack([r[both] for _, r in decoded]).astype(np.float64)


def _interval(values: list[float]) -> tuple[float, float] | None:
    v = np.array([x for x in values if not math.isnan(x)])
    if len(v) < BOOTSTRAP // 2:
        return None
    return float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))


def _index(method: str) -> int:
    known = all_methods()
    return known.index(method) if method in known else len(known)


def agreement(cells: Sequence[Any], seed: int = 0) -> list[Agreement]:
    """Every pair of methods on every task with 3 or more backbones that both methods score
    (top-1 cells)."""
    out = []
    top1 = [c for c in cells if c.metric == "top1"]
    tasks = list(dict.fromkeys(c.task for c in top1))
    for task in tasks:
        by_method: dict[str, dict[str, Any]] = {}
        for c in top1:
            if c.task == task:
                by_method.setdefault(c.method, {})[c.model] = c
        order = sorted(by_method, key=lambda m: (m not in all_methods(), _index(m)))
        for ma, mb in itertools.combinations(order, 2):
            models = tuple(m for m in by_method[ma] if m in by_method[mb])
            if len(models) < 3:
                continue
            ca = [by_method[ma][m] for m in models]
            cb = [by_method[mb][m] for m in models]
            rho, tau = rank_correlations(
                np.array([c.value for c in ca]), np.array([c.value for c in cb])
            )
            ci_rho = ci_tau = None
            hits = _hits(ca + cb)
            if hits is not None:
                # every entry's accuracy on the same resampled test images (B, entries)
                rng = np.random.default_rng(seed)
                n_img = hits.shape[1]
                counts = np.stack(
                    [
                        np.bincount(rng.integers(0, n_img, n_img), minlength=n_img)
                        for _ in range(BOOTSTRAP)
                    ]
                )
                acc = counts @ hits.T / n_img
                rhos, taus = rank_correlations(acc[:, : len(models)], acc[:, len(models) :])
                ci_rho, ci_tau = _interval(list(rhos)), _interval(list(taus))
            out.append(
                Agreement(task, ma, mb, models, float(rho[0]), float(tau[0]), ci_rho, ci_tau)
            )
    return out


def gap_flags(cells: Sequence[Any], points: float = FLAG_POINTS) -> list[Flag]:
    """Each (task, backbone) where one method's top-1 is `points` or more below another's."""
    flags = []
    top1 = [c for c in cells if c.metric == "top1"]
    for task, model in dict.fromkeys((c.task, c.model) for c in top1):
        mine = [c for c in top1 if (c.task, c.model) == (task, model)]
        for lo in mine:
            hi = max(mine, key=lambda c: c.value)
            if hi.value - lo.value >= points / 100:
                flags.append(Flag(task, model, lo.method, hi.method, lo.value, hi.value))
    return flags
