"""The box probe's records: its validation curve, its chosen head's test COCO AP (and VOC AP50
for VOC layouts) with basic bootstrap intervals over test images (`basic_interval`), and the
training-free CorLoc beside it: the stage every box method shares (as
`dense.data.dense_records` for masks)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from probekit.cache.store import FeatureStore
from probekit.detection.data import DetData
from probekit.detection.metrics import (
    COCO_METRICS,
    ImageDets,
    ImageTruth,
    bootstrap_coco,
    coco_metrics,
    corloc,
    voc_ap50,
)
from probekit.errors import ProbekitError
from probekit.records import Metric, Record

if TYPE_CHECKING:
    from probekit.probes.base import ProbeOptions

__all__ = ["BOOTSTRAP", "basic_interval", "detection_records"]

BOOTSTRAP = 200  # resamples of the test images a metric's interval is taken from


def basic_interval(values: np.ndarray, point: float) -> list[float] | None:
    """The basic (reverse percentile) bootstrap interval of `point` from its resampled
    `values`: 2 * point - their 97.5% and 2.5% quantiles. AP takes the best precision at each
    recall, a max that noise pushes up: resampled APs run above the estimate, and a plain
    percentile interval would sit above it; the basic interval reflects their spread about
    the estimate instead, clipped to [0, 1]. None where half the resamples have no value
    (nothing to score)."""
    finite = values[np.isfinite(values)]
    if not np.isfinite(point) or not len(finite) or len(finite) < len(values) // 2:
        return None
    lo, hi = np.quantile(finite, [0.025, 0.975])
    return [float(max(0.0, 2 * point - hi)), float(min(1.0, 2 * point - lo))]  # AP's range


def detection_records(
    store: FeatureStore, options: ProbeOptions, methods: Sequence[str], base: Record
) -> tuple[list[Record], dict[str, dict[str, Any]]]:
    """Every box method's validation curve and its chosen head's test metrics (intervals over
    test images; each metric's resamples kept for paired comparisons), then CorLoc."""
    from probekit.methods import PROBE_METHODS

    data = DetData.prepare(store, options)
    split = options.test_split
    rows = np.flatnonzero(store.usable(split))
    if not len(rows):
        raise ProbekitError(f"split {split!r} has no usable images to test on.")
    truth, scales = data.truth(split, rows)
    records: list[Record] = []
    selected: dict[str, dict[str, Any]] = {}
    ids_digest = store.fingerprint
    for m in methods:
        sel = PROBE_METHODS[m].select()(data, options.of_method(m))
        selected[m] = {"feature": sel.feature, **sel.config}
        records += [
            replace(
                base,
                split="val",
                feature=name,
                method=m,
                metric="val_ap",
                value=float(ap),
                n=len(data.val_rows),
                hyper=cfg,
            )
            for name, cfg, ap in sel.curve
        ]
        found = sel.detect(split, rows)
        dets = [ImageDets(b / s, sc, c) for (b, sc, c), s in zip(found, scales, strict=True)]
        at = replace(base, split=split, feature=sel.feature, method=m, n=len(rows))
        at = replace(at, hyper=sel.config)
        records += _test_records(at, truth, dets, data, options.seed, ids_digest)
    records += _corloc_records(data, base, split, rows, truth)
    return records, selected


def _test_records(
    at: Record,
    truth: list[ImageTruth],
    dets: list[ImageDets],
    data: DetData,
    seed: int,
    fingerprint: str | None,
) -> list[Record]:
    values = coco_metrics(truth, dets, data.n_classes)
    boot = bootstrap_coco(truth, dets, data.n_classes, BOOTSTRAP, seed)
    out = []
    for k in COCO_METRICS:
        extra = {
            **at.extra,
            "ci95": basic_interval(boot[k], values[k]),
            # the same resamples for every probe on these images: paired deltas subtract them
            "boot": [None if not np.isfinite(v) else round(float(v), 6) for v in boot[k]],
            "boot_seed": seed,
            "test_fingerprint": fingerprint,
        }
        out.append(replace(at, metric=cast(Metric, k), value=values[k], extra=extra))
    if data.layout() == "voc":  # VOC's own AP50 beside COCO's: difficult boxes ignored
        for metric, eleven in (("voc07_ap50", True), ("voc_ap50", False)):
            value = voc_ap50(truth, dets, data.n_classes, eleven)
            out.append(replace(at, metric=cast(Metric, metric), value=value))
    return out


def _corloc_records(
    data: DetData, base: Record, split: str, rows: np.ndarray, truth: list[ImageTruth]
) -> list[Record]:
    """CorLoc of LOST's box on each token layer: validation CorLoc per layer, the best layer's
    test CorLoc with its interval (images resampled)."""
    from probekit.detection.corloc import lost_box
    from probekit.metrics import bootstrap_ci

    val_truth, val_scales = data.truth(data.val_split, data.val_rows)
    curve = []
    for name in data.names():
        boxes = _lost_boxes(data, data.val_split, name, data.val_rows, lost_box)
        value, _ = corloc(val_truth, boxes / val_scales[:, None])
        curve.append((name, value))
    records = [
        replace(
            base,
            split="val",
            feature=name,
            method="detect",
            metric="val_corloc",
            value=value,
            n=len(data.val_rows),
            hyper={"rule": "lost"},
        )
        for name, value in curve
    ]
    best = max(range(len(curve)), key=lambda i: (curve[i][1], -i))
    name = curve[best][0]
    _, scales = data.truth(split, rows)
    boxes = _lost_boxes(data, split, name, rows, lost_box)
    value, hits = corloc(truth, boxes / scales[:, None])
    lo, hi = bootstrap_ci(hits.astype(float), seed=data.options.seed)
    records.append(
        replace(
            base,
            split=split,
            feature=name,
            method="detect",
            metric="corloc",
            value=value,
            n=len(rows),
            hyper={"rule": "lost", "val_corloc": curve[best][1]},
            extra={**base.extra, "ci95": [lo, hi], "hits": hits.astype(int).tolist()},
        )
    )
    return records


def _lost_boxes(data: DetData, split: str, name: str, rows: np.ndarray, rule: Any) -> np.ndarray:
    grid = data.store.token_grid(name)
    out = np.zeros((len(rows), 4))
    for s in range(0, len(rows), 64):
        part = rows[s : s + 64]
        tokens = data.store.tokens(split, name, part)
        for i, t in enumerate(tokens):
            out[s + i] = rule(t, grid, data.size)
    return out
