"""The report's sections on how far to trust the numbers, from the records alone: calibration
of the fitted probes (ECE before and after temperature scaling), label-free and cluster
metrics of the features the leaderboard uses, and how alike the backbones' representations
are (CKA, mutual kNN). Each gives a note (one line a number) and table rows."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from probekit.records import Record
from probekit.report.compute import Report

__all__ = [
    "CALIBRATION_HEADER",
    "CALIBRATION_NOTE",
    "ENSEMBLE_HEADER",
    "ENSEMBLE_NOTE",
    "FEWSHOT_NOTE",
    "SIMILARITY_HEADER",
    "SIMILARITY_NOTE",
    "STRUCTURE_HEADER",
    "STRUCTURE_NOTE",
    "Section",
    "calibration_rows",
    "ensemble_row",
    "ensemble_rows",
    "fewshot_table",
    "leaderboard_feature",
    "sections",
    "similarity_rows",
    "structure_rows",
]

CALIBRATION_HEADER = ["model", "method", "ECE (%)", "ECE after scaling (%)", "temperature"]
CALIBRATION_NOTE = (
    "ECE: how far a probe's confidence is from how often it is right, averaged over 15 "
    "confidence bins (0: a 70%-sure answer is right 70% of the time). After scaling: the same "
    "once the logits are divided by one temperature fitted on validation data (how much of "
    "the gap one number fixes)."
)
STRUCTURE_HEADER = ["model", "feature", "RankMe", "k-means NMI", "k-means ARI"]
STRUCTURE_NOTE = (
    "Without training a probe, on the feature each backbone's leaderboard entry uses. RankMe: "
    "how many directions the features really use (no labels needed; within one backbone "
    "family, higher tends to transfer better). NMI / ARI: how well k-means, one cluster per "
    "class, recovers the classes (1: exactly, 0: chance)."
)
SIMILARITY_HEADER = ["model a", "model b", "features", "images", "CKA", "mutual kNN"]
SIMILARITY_NOTE = (
    "How alike two backbones' representations of the same test images are. CKA: 1 when one "
    "is a rotation and scaling of the other, near 0 when unrelated. Mutual kNN: the share of "
    "each image's nearest neighbours both agree on. Alike backbones gain little as an "
    "ensemble; different ones may."
)


def _pct(v: float) -> str:
    return "-" if math.isnan(v) else f"{100 * v:.2f}"


def leaderboard_feature(rep: Report, task: str, model: str) -> str | None:
    """The feature of `model`'s first entry on `task` (in the report's method order)."""
    for m in rep.methods:
        c = rep.cell(task, m, model)
        if c is not None:
            return c.feature
    return None


def calibration_rows(rep: Report, task: str) -> list[list[str]]:
    got: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rep.records:
        if r.kind == "probe" and r.metric in ("ece", "ece_ts") and r.task == task:
            got.setdefault((r.model, r.method), {})[r.metric] = r
    rows = []
    for (model, method), recs in got.items():
        if "ece" not in recs or "ece_ts" not in recs:
            continue
        ts = recs["ece_ts"]
        rows.append(
            [
                model,
                method,
                _pct(recs["ece"].value),
                _pct(ts.value),
                f"{float(ts.extra.get('temperature', math.nan)):.2f}",
            ]
        )
    return rows


def structure_rows(rep: Report, task: str) -> list[list[str]]:
    rows = []
    for model in rep.models:
        feature = leaderboard_feature(rep, task, model)
        vals = {
            r.metric: r.value
            for r in rep.records
            if r.kind == "structure"
            and r.model == model
            and r.dataset == task
            and r.feature == feature
        }
        if feature is None or not vals:
            continue
        rank = vals.get("rankme", math.nan)
        rows.append(
            [
                model,
                feature,
                "-" if math.isnan(rank) else f"{rank:.1f}",
                f"{vals.get('nmi', math.nan):.3f}",
                f"{vals.get('ari', math.nan):.3f}",
            ]
        )
    return rows


def similarity_rows(rep: Report, task: str) -> list[list[str]]:
    pairs: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for r in rep.records:
        if r.kind == "compare" and r.dataset == task:
            key = (r.model, str(r.extra.get("model_b")), r.feature, str(r.extra.get("feature_b")))
            pairs.setdefault(key, {"n": r.n})[r.metric] = r.value
    return [
        [
            a,
            b,
            fa if fa == fb else f"{fa} / {fb}",
            str(v["n"]),
            f"{v.get('cka', math.nan):.3f}",
            f"{v.get('mutual_knn', math.nan):.3f}",
        ]
        for (a, b, fa, fb), v in pairs.items()
    ]


FEWSHOT_NOTE = (
    "Few-shot: test top-1 (%) when each class has only this many train images, the mean over "
    "seeded episodes with a 95% t interval; every hyperparameter chosen on validation images, "
    "which are never sampled. A backbone that leads here needs fewer labels."
)


def fewshot_table(rep: Report, task: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of one task's few-shot results: model, method, one column per shots."""
    got: dict[tuple[str, str], dict[int, Any]] = {}
    for r in rep.records:
        if r.kind == "fewshot" and r.task == task and r.metric == "top1":
            got.setdefault((r.model, r.method), {})[int(r.hyper["shots"])] = r
    shots = sorted({s for by in got.values() for s in by})
    rows = []
    for (model, method), by in got.items():
        row = [model, method]
        for s in shots:
            got_s = by.get(s)
            if got_s is None:
                row.append("-")
                continue
            lo, hi = got_s.extra.get("ci95") or (math.nan, math.nan)
            row.append(f"{100 * got_s.value:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]")
        rows.append(row)
    return ["model", "method", *[f"{s}-shot" for s in shots]], rows


ENSEMBLE_HEADER = ["model a", "model b", "a alone", "b alone", "side by side", "gain [95% CI]", "p"]
ENSEMBLE_NOTE = (
    "Does an ensemble pay? Logistic regression on both backbones' features side by side, "
    "against the better of the two alone, on the same test images (top-1 %; a paired interval "
    "of the gain, and McNemar's p: below 0.05, unlikely to be noise)."
)


def ensemble_row(r: Record) -> list[str]:
    """One `concat_gain` record as a row of ENSEMBLE_HEADER."""
    e = r.extra
    lo, hi = e.get("ci95") or (math.nan, math.nan)
    return [
        f"{r.model} ({r.feature})",
        f"{e.get('model_b')} ({e.get('feature_b')})",
        _pct(float(e.get("top1_a", math.nan))),
        _pct(float(e.get("top1_b", math.nan))),
        _pct(float(e.get("top1_both", math.nan))),
        f"{100 * r.value:+.2f} [{100 * lo:+.1f}, {100 * hi:+.1f}]",
        f"{float(e.get('mcnemar_p', math.nan)):.2g}",
    ]


def ensemble_rows(rep: Report, task: str) -> list[list[str]]:
    return [
        ensemble_row(r)
        for r in rep.records
        if r.kind == "compare" and r.metric == "concat_gain" and r.dataset == task
    ]


@dataclass(frozen=True)
class Section:
    """One of the report's trust sections: a title, its note, and a table per task."""

    title: str
    note: str
    tables: list[tuple[str, list[str], list[list[str]]]]  # (task, header, rows)


def sections(rep: Report) -> list[Section]:
    """Few-shot, calibration, structure, similarity and side by side, each where the records
    have it (what the Markdown report and the terminal both show)."""
    kinds: list[tuple[str, str, Callable[[str], tuple[list[str], list[list[str]]]]]] = [
        ("Few-shot", FEWSHOT_NOTE, lambda t: fewshot_table(rep, t)),
        (
            "Calibration of the probes",
            CALIBRATION_NOTE,
            lambda t: (CALIBRATION_HEADER, calibration_rows(rep, t)),
        ),
        (
            "Without labels: effective rank and clusters",
            STRUCTURE_NOTE,
            lambda t: (STRUCTURE_HEADER, structure_rows(rep, t)),
        ),
        (
            "How alike the backbones are",
            SIMILARITY_NOTE,
            lambda t: (SIMILARITY_HEADER, similarity_rows(rep, t)),
        ),
        (
            "Backbones side by side",
            ENSEMBLE_NOTE,
            lambda t: (ENSEMBLE_HEADER, ensemble_rows(rep, t)),
        ),
    ]
    out = []
    for title, note, table_of in kinds:
        tables = [(t, *table_of(t)) for t in rep.tasks]
        tables = [(t, header, rows) for t, header, rows in tables if rows]
        if tables:
            out.append(Section(title, note, tables))
    return out
