"""Leaderboards from result records: the entries (kNN chosen on its selection split, probes
as chosen on validation), layer curves, the z-score ranking, reference deltas and the entries
within noise of each column's best. Reads records only; draws nothing (see `render`).

Everything here is computed from result records (JSON Lines: the `results.jsonl` of a triage, or
the `*.knn-*.jsonl` / `*.probe-*.jsonl` files written next to feature stores), so reports from
different runs and machines combine: `probekit report A/results.jsonl B/results.jsonl`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from probekit.errors import ProbekitError
from probekit.methods import PROBE_METHODS, all_methods
from probekit.metrics import decode_outcomes, mcnemar_p, paired_bootstrap_ci
from probekit.records import SELECTION_SPLITS, Metric, Record, select_knn
from probekit.report.agreement import Agreement, Flag, agreement, gap_flags
from probekit.segmentation import paired_dense_delta

__all__ = [
    "BEST_NOTE",
    "BOB_CAVEAT",
    "BOX_DELTA_NOTE",
    "BOX_METRICS",
    "BOX_NOTE",
    "DELTA_COLUMNS",
    "DELTA_NOTE",
    "Cell",
    "Report",
    "build_report",
    "delta_texts",
    "leaderboard_cells",
    "load_records",
]


BOB_CAVEAT = (
    "Caveat (Battle of the Backbones, Goldblum et al. 2023): kNN and linear probes favour CNNs "
    "over ViTs relative to full finetuning, and underrate MAE-style models; treat this ranking "
    "as a triage, not a finetuning result."
)
DEFAULT_K = 20  # DINO's k, used when a record set has no selection records
# the hyperparameters shown of a probe method the registry does not know (records of others)
_SHOWN = ("lr", "wd", "epoch", "C", "optimizer")


# validation scores of each feature a probe tried (layer curves): one record a feature
CURVE_METRICS = ("val_top1", "val_miou", "val_ap", "val_corloc")


def _key(r: Record) -> tuple[Any, ...]:
    """Records with the same key are the same measurement: a later one replaces an earlier."""
    if r.kind in ("extract", "error", "time"):
        return (r.kind, r.model, r.dataset, r.extra.get("stage"))
    if r.kind == "probe" and r.metric not in CURVE_METRICS:
        # a probe's test numbers belong to the probe chosen on validation: its feature is a
        # result, not part of what was measured, so a rerun replaces them whatever it chose
        return (r.kind, r.model, r.train_dataset, r.dataset, r.split, r.method, r.metric)
    hyper: tuple[Any, ...] = ()
    if r.kind == "knn":
        hyper = tuple(sorted((k, json.dumps(v)) for k, v in r.hyper.items()))
    elif r.kind == "compare":  # a pair: the second model and feature are part of it
        hyper = (r.extra.get("model_b"), r.extra.get("feature_b"))
    elif r.kind == "fewshot":  # one number of shots of one set of episodes
        hyper = tuple(r.hyper.get(k) for k in ("shots", "episodes", "seed"))
    return (r.kind, r.model, r.task, r.split, r.feature, r.method, hyper, r.metric)


def _as_records(records: Iterable[Record | Mapping[str, Any]]) -> list[Record]:
    return [r if isinstance(r, Record) else Record.from_dict(r) for r in records]


def load_records(paths: Sequence[str | os.PathLike[str]]) -> list[Record]:
    """Read result records from JSON Lines files, or directories of them (results.jsonl first);
    records of the shapes written before the schema (`Record.from_dict`) are read as well.

    A record measured again in a later file replaces the earlier one.
    """
    files: list[Path] = []
    for p in map(Path, paths):
        p = p.expanduser()
        if p.is_dir():
            inner = p / "results.jsonl"
            found = [inner] if inner.is_file() else sorted(p.glob("*.jsonl"))
            if not found:
                raise ProbekitError(f"{str(p)!r} holds no result records (*.jsonl).")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise ProbekitError(f"no such results file or directory: {str(p)!r}.")
    merged: dict[tuple[Any, ...], Record] = {}
    for f in files:
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise ProbekitError(f"{f}:{n} is not a JSON record ({e.msg}).") from None
            if not isinstance(raw, dict):
                raise ProbekitError(f"{f}:{n} is not a JSON object.")
            try:
                r = Record.from_dict(raw)
            except (KeyError, TypeError, ValueError) as e:
                raise ProbekitError(f"{f}:{n} is not a probekit record ({e}).") from None
            merged[_key(r)] = r
    return list(merged.values())


# --------------------------------------------------------------------------- summary


@dataclass(frozen=True)
class Cell:
    """One leaderboard entry: a model's test `metric` (top1) on a task by one method."""

    task: str  # dataset, or "source->target" for a transfer
    method: str
    model: str
    value: float
    ci95: tuple[float, float] | None
    feature: str
    hyper: dict[str, Any]
    n: int
    selected_on: str
    # which test rows were scored and right (`encode_outcomes`), for paired differences
    outcomes: dict[str, Any] | None = field(default=None, repr=False)
    metric: str = "top1"

    def ci_text(self) -> str:
        if self.ci95 is None or any(math.isnan(v) for v in self.ci95):
            return ""
        return f"[{100 * self.ci95[0]:.1f}, {100 * self.ci95[1]:.1f}]"

    def hyper_text(self) -> str:
        return ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.hyper.items()
        )


@dataclass
class Report:
    """A leaderboard and everything the report shows, computed from records."""

    records: list[Record]
    cells: list[Cell]
    tasks: list[str]
    models: list[str]
    methods: list[str]
    ranking: dict[str, list[tuple[str, float, int]]]  # method -> (model, mean z, tasks)
    curves: dict[tuple[str, str, str], list[tuple[float, str, float]]]  # (task, method, model)
    timing: dict[str, dict[str, float]]
    errors: list[Record]
    reference: str | None = None
    deltas: list[dict[str, Any]] = field(default_factory=list)
    # (task, method, model, metric) of each column's best entry and those not significantly
    # different from it
    best: set[tuple[str, str, str, str]] = field(default_factory=set)
    metrics: list[str] = field(default_factory=lambda: ["top1"])  # a leaderboard per metric
    # per task: what makes its numbers less than honest (duplicates, overlap, classes with
    # no train image), as the records say it
    warnings: dict[str, list[str]] = field(default_factory=dict)
    # per model: img_size, native_size, params_m, gmacs, and images/s of its extraction per
    # dataset (`images_per_s`), from the extract records
    costs: dict[str, dict[str, Any]] = field(default_factory=dict)
    # how far the methods' rankings agree per task, and backbones one method underrates
    agreements: list[Agreement] = field(default_factory=list)
    flags: list[Flag] = field(default_factory=list)

    def cost_of(self, model: str, task: str) -> dict[str, Any]:
        """img_size, params_m, gmacs, images_per_s of `model`'s entry on `task` (empty where
        the records do not say)."""
        c = self.costs.get(model)
        if not c:
            return {}
        rates = c.get("images_per_s", {})
        rate = rates.get(task.split("->")[-1]) or rates.get(task.split("->")[0])
        return {**{k: c.get(k) for k in ("img_size", "params_m", "gmacs")}, "images_per_s": rate}

    def size_note(self, model: str) -> str:
        """ "224px", or "224px, pretrained 518px" where the evaluated size is not the
        pretrained one ("" where the records do not say)."""
        c = self.costs.get(model) or {}
        size, native = c.get("img_size"), c.get("native_size")
        if not size:
            return ""
        return f"{size}px" + (f", pretrained {native}px" if native and native != size else "")

    def cell(self, task: str, method: str, model: str, metric: str = "top1") -> Cell | None:
        for c in self.cells:
            if (c.task, c.method, c.model, c.metric) == (task, method, model, metric):
                return c
        return None

    def methods_of(self, task: str, metric: str) -> list[str]:
        """The methods with entries of `metric` on `task` (a leaderboard's columns)."""
        return [
            m for m in self.methods if any(self.cell(task, m, mod, metric) for mod in self.models)
        ]

    def shows(self, task: str, metric: str) -> bool:
        """Whether `task` has entries of `metric` (a leaderboard to show)."""
        return any(c.task == task and c.metric == metric for c in self.cells)


def _column(method: str) -> tuple[int, str]:
    """The registry's order of methods (methods it lacks, from other runs, after them)."""
    order = all_methods()
    return (order.index(method), "") if method in order else (len(order), method)


def _first_seen(xs: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(xs))


def _knn_config(r: Record) -> tuple[str, Any, Any]:
    return (r.feature, r.hyper.get("k"), r.hyper.get("vote"))


def _knn_cells(recs: list[Record]) -> list[Cell]:
    """kNN: choose (feature, k, vote) on the selection split, then read that on test."""
    by_run: dict[tuple[str, str], list[Record]] = {}
    for r in recs:
        if r.kind == "knn" and r.metric == "top1":
            by_run.setdefault((r.model, r.task), []).append(r)
    cells = []
    for (model, task), rs in by_run.items():
        test = [r for r in rs if r.split not in SELECTION_SPLITS]
        if not test:
            continue
        sel = [r for r in rs if r.split in SELECTION_SPLITS]
        on = "test (given)"
        if any(r.extra.get("selected_on") for r in test):  # a transfer record
            pick = test[0]
            on = str(pick.extra["selected_on"])
        elif sel:
            split = "val" if any(r.split == "val" for r in sel) else "train"
            best = select_knn(r for r in sel if r.split == split)
            match = [r for r in test if _knn_config(r) == _knn_config(best)]
            if not match:
                continue
            pick = match[0]
            on = "val split" if split == "val" else "leave-one-out on train"
        else:  # no selection records: DINO's default k on the pooled head, nothing chosen
            default = [r for r in test if r.layer == "head" and r.hyper.get("k") == DEFAULT_K]
            if not default:
                continue
            pick = default[0]
            on = f"none (head, k={DEFAULT_K})"
        ci = pick.extra.get("ci95")
        cells.append(
            Cell(
                task,
                "knn",
                model,
                float(pick.value),
                (float(ci[0]), float(ci[1])) if ci else None,
                pick.feature,
                {"k": pick.hyper.get("k"), "vote": pick.hyper.get("vote")},
                int(pick.n),
                on,
                pick.extra.get("outcomes"),
                pick.metric,
            )
        )
    return cells


# dense probes' leaderboards (linseg, dense-knn); their paired statistics read per-image class
# counts (`segmentation.class_counts`), kept on the miou record
DENSE_METRICS = ("miou", "pixel_acc")
DENSE_NOTE = (
    "Dense tasks (`: miou`, `: pixel_acc`): mean IoU over the classes present in the test "
    "masks or the predictions (255 ignored), and pixel accuracy, of a linear segmentation "
    "probe (`linseg`, DINOv2's linear protocol) or dense kNN (`dense-knn`, Hummingbird) on "
    "frozen patch tokens at the model's input size; intervals resample test images. Layer, "
    "learning rate, weight decay, epoch and k were chosen on validation images."
)


# box probes' leaderboards (detect); their paired statistics read each metric's bootstrap
# resamples of the test images (the same resamples for every probe: `detection.records`), or
# for CorLoc each image's hit
BOX_METRICS = ("ap", "ap50", "ap75", "corloc")
BOX_NOTE = (
    "Detection tasks (`: ap`, `: ap50`, `: ap75`): COCO box AP (IoU 0.50:0.95, 101 recall "
    "points, 100 detections an image; faster-coco-eval) of a light FCOS-style head trained on "
    "frozen patch tokens at the model's input size (`detect`: a layer's ViTDet-style simple "
    "pyramid or a CNN's stages); layer set, learning rate, weight decay and epoch were chosen "
    "on validation AP. A ranking proxy, not COCO mAP after finetuning a detector. `: corloc`: "
    "the share of test images whose one box found without training (LOST's rule on a layer's "
    "tokens, the layer chosen on validation) overlaps a true box at IoU >= 0.5. AP's "
    "intervals are basic bootstrap intervals over test images (AP's precision envelope is a "
    "max, so resampled APs run high: a percentile interval would sit above the estimate); "
    "\\*: for AP, the paired interval of the difference to the best holds 0."
)


def _box_outcomes(r: Record) -> dict[str, Any] | None:
    """What a box metric's paired statistics read: its resamples, or its images' hits."""
    if r.metric == "corloc":
        hits = r.extra.get("hits")
        return None if hits is None else {"hits": hits, "dataset": r.dataset}
    boot = r.extra.get("boot")
    if boot is None:
        return None
    key = (r.extra.get("test_fingerprint"), r.extra.get("boot_seed"), r.dataset)
    return {"boot": boot, "key": list(key), "value": float(r.value)}


def _box_delta(
    a: dict[str, Any] | None, b: dict[str, Any] | None
) -> tuple[float, float, float] | None:
    """(A - B, 95% paired interval) of a box metric over the same test images: the basic
    bootstrap interval of the difference from the two probes' values on the same resamples
    (`detection.records.basic_interval`), or for CorLoc a paired bootstrap of the images'
    hits; None unless both cover the same images."""
    if not a or not b:
        return None
    if "hits" in a and "hits" in b:
        ha, hb = np.asarray(a["hits"], bool), np.asarray(b["hits"], bool)
        if a["dataset"] != b["dataset"] or ha.shape != hb.shape:
            return None
        lo, hi = paired_bootstrap_ci(ha, hb)
        return float(ha.mean() - hb.mean()), lo, hi
    if "boot" not in a or "boot" not in b or a["key"] != b["key"] or a["key"][0] is None:
        return None
    ba = np.array([np.nan if v is None else v for v in a["boot"]], dtype=np.float64)
    bb = np.array([np.nan if v is None else v for v in b["boot"]], dtype=np.float64)
    if ba.shape != bb.shape:
        return None
    delta = float(a["value"]) - float(b["value"])
    d = ba - bb
    d = d[np.isfinite(d)]
    if not math.isfinite(delta) or len(d) < len(ba) // 2 or not len(d):
        return None
    lo, hi = np.quantile(d, [0.025, 0.975])
    return delta, float(2 * delta - hi), float(2 * delta - lo)


def _probe_cells(recs: list[Record]) -> list[Cell]:
    counts = {
        (r.model, r.task, r.method, r.split): r.extra["class_counts"]
        for r in recs
        if r.kind == "probe" and r.metric == "miou" and "class_counts" in r.extra
    }
    cells = []
    for r in recs:
        if r.kind != "probe" or r.metric not in ("top1", *DENSE_METRICS, *BOX_METRICS):
            continue
        outcomes = r.extra.get("outcomes")
        if r.metric in DENSE_METRICS:
            found = counts.get((r.model, r.task, r.method, r.split))
            outcomes = None if found is None else {"class_counts": found, "dataset": r.dataset}
        elif r.metric in BOX_METRICS:
            outcomes = _box_outcomes(r)
        ci = r.extra.get("ci95")
        entry = PROBE_METHODS.get(r.method)
        shown = entry.shown if entry is not None else _SHOWN
        hyper = {k: v for k, v in r.hyper.items() if k in shown}
        cells.append(
            Cell(
                r.task,
                r.method,
                r.model,
                float(r.value),
                (float(ci[0]), float(ci[1])) if ci else None,
                r.feature,
                hyper,
                int(r.n),
                "validation",
                outcomes,
                r.metric,
            )
        )
    return cells


def _dense_delta(
    a: dict[str, Any] | None, b: dict[str, Any] | None, metric: str
) -> tuple[float, float, float] | None:
    """(A - B, 95% paired interval) of a dense metric over the test images both scored, from
    their per-image class counts; None unless both have counts of the same images."""
    if not a or not b or "class_counts" not in a or "class_counts" not in b:
        return None
    ca, cb = np.asarray(a["class_counts"]), np.asarray(b["class_counts"])
    if a.get("dataset") != b.get("dataset") or ca.shape != cb.shape:
        return None
    return paired_dense_delta(ca, cb)[metric]


def _depth(layer: str, num_layers: int) -> float:
    """Relative depth of a stored layer: block i of L at (i + 1) / L; the head just past 1."""
    if layer == "head":
        return 1.08
    i = int(layer.removeprefix("layer"))
    return (i + 1) / max(num_layers, 1)


def _curves(
    recs: list[Record], cells: list[Cell], num_layers: dict[str, int]
) -> dict[tuple[str, str, str], list[tuple[float, str, float]]]:
    """Accuracy by layer depth: kNN test top-1 at the chosen k/vote/pool, probes' val top-1."""
    curves: dict[tuple[str, str, str], list[tuple[float, str, float]]] = {}
    chosen = {(c.task, c.model): c for c in cells if c.method == "knn" and c.metric == "top1"}
    pts: dict[tuple[str, str, str], dict[str, tuple[float, float]]] = {}
    for r in recs:
        if r.kind == "knn" and r.metric == "top1" and r.split not in SELECTION_SPLITS:
            c = chosen.get((r.task, r.model))
            if c is None or r.task != r.dataset:
                continue
            if (r.hyper.get("k"), r.hyper.get("vote")) != (c.hyper["k"], c.hyper["vote"]):
                continue
            method, value = "knn", float(r.value)
            prefer = r.pool == c.feature.split("/")[1]
        elif r.kind == "probe" and r.metric in ("val_top1", "val_miou", "val_ap"):
            method, value, prefer = r.method, float(r.value), True
        else:
            continue
        if r.layer != "head" and not r.layer.removeprefix("layer").isdigit():
            continue  # a concatenation of layers (last4/cls) has no one depth
        key = (r.task, method, r.model)
        slot = pts.setdefault(key, {})
        # one point per layer: the chosen pool where the layer has it, else the best pool
        rank = (1.0 if prefer else 0.0, value)
        if r.layer not in slot or rank > slot[r.layer]:
            slot[r.layer] = rank
    for key, layers in pts.items():
        nl = num_layers.get(key[2]) or 1 + max(
            (int(name.removeprefix("layer")) for name in layers if name != "head"), default=0
        )
        curves[key] = sorted((_depth(name, nl), name, v[1]) for name, v in layers.items())
    return curves


def _zscore_ranking(
    cells: list[Cell], methods: list[str], tasks: list[str], models: list[str]
) -> dict[str, list[tuple[str, float, int]]]:
    """BoB's aggregate: z-score each task's accuracies across models, average over tasks."""
    ranking: dict[str, list[tuple[str, float, int]]] = {}
    for m in methods:
        zs: dict[str, list[float]] = {mod: [] for mod in models}
        for t in tasks:
            vals = {
                c.model: c.value
                for c in cells
                if c.method == m and c.task == t and c.metric == "top1"
            }
            if len(vals) < 2:
                continue
            arr = np.array(list(vals.values()))
            sd = float(arr.std())
            for mod, v in vals.items():
                zs[mod].append((v - float(arr.mean())) / sd if sd > 0 else 0.0)
        rows = [(mod, float(np.mean(z)), len(z)) for mod, z in zs.items() if z]
        if rows:
            ranking[m] = sorted(rows, key=lambda x: -x[1])
    return ranking


def _deltas(cells: list[Cell], reference: str) -> list[dict[str, Any]]:
    out = []
    ref = {(c.task, c.method, c.metric): c for c in cells if c.model == reference}
    for c in sorted(cells, key=lambda c: (c.task, _column(c.method))):
        r = ref.get((c.task, c.method, c.metric))
        shown = ("top1", *DENSE_METRICS, *BOX_METRICS)
        if c.metric not in shown or c.model == reference or r is None:
            continue  # top-1's paired statistics count images right; dense ones class counts
        overlap = None
        if c.ci95 and r.ci95:
            overlap = c.ci95[0] <= r.ci95[1] and r.ci95[0] <= c.ci95[1]
        if c.metric in DENSE_METRICS:  # no McNemar: a pixel is not an image
            paired = _dense_delta(c.outcomes, r.outcomes, c.metric)
            delta_ci = None if paired is None else [paired[1], paired[2]]
            p_value = None
        elif c.metric in BOX_METRICS:  # McNemar for CorLoc's hits alone: AP is no count
            paired = _box_delta(c.outcomes, r.outcomes)
            delta_ci = None if paired is None else [paired[1], paired[2]]
            p_value = None
            if c.metric == "corloc" and paired is not None:
                assert c.outcomes is not None and r.outcomes is not None
                p_value = mcnemar_p(
                    np.asarray(c.outcomes["hits"], bool), np.asarray(r.outcomes["hits"], bool)
                )
        else:
            delta_ci = _paired_ci(c.outcomes, r.outcomes)
            p_value = _paired(c.outcomes, r.outcomes, mcnemar_p)
        out.append(
            {
                "task": c.task,
                "method": c.method,
                "model": c.model,
                "metric": c.metric,
                "value": c.value,
                "reference_value": r.value,
                "delta": c.value - r.value,
                "delta_ci95": delta_ci,
                "mcnemar_p": p_value,
                "ci_overlap": overlap,
            }
        )
    return out


def _paired(
    a: dict[str, Any] | None,
    b: dict[str, Any] | None,
    stat: Callable[[np.ndarray, np.ndarray], Any],
) -> Any:
    """`stat` of two entries' hits over the test rows both scored; None unless both have
    outcomes of the same dataset's rows."""
    if not a or not b or a.get("fingerprint") is None:
        return None
    if (a["rows"], a["fingerprint"]) != (b["rows"], b["fingerprint"]):
        return None
    (scored_a, right_a), (scored_b, right_b) = decode_outcomes(a), decode_outcomes(b)
    both = scored_a & scored_b
    return stat(right_a[both], right_b[both]) if both.any() else None


def _paired_ci(a: dict[str, Any] | None, b: dict[str, Any] | None) -> list[float] | None:
    """95% paired bootstrap interval of a model's top-1 minus the reference's, image by image."""
    ci = _paired(a, b, paired_bootstrap_ci)
    return None if ci is None else list(ci)


def delta_method(d: dict[str, Any]) -> str:
    """A delta row's method, with its metric where it is not top-1 ("linseg (miou)")."""
    return str(d["method"]) + (f" ({d['metric']})" if d.get("metric", "top1") != "top1" else "")


def delta_texts(d: dict[str, Any]) -> list[str]:
    """A delta row's difference, paired interval and interval overlap, as the tables show them."""
    ci = d.get("delta_ci95")
    return [
        f"{100 * d['delta']:+.2f}",
        f"[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci else "-",
        "-" if d.get("mcnemar_p") is None else f"{d['mcnemar_p']:.2g}",
        {True: "yes", False: "no", None: "-"}[d["ci_overlap"]],
    ]


BEST_NOTE = (
    "*: the best of its column, and every entry not significantly different from it on the "
    "same test images (exact McNemar test, p >= 0.05; mIoU and pixel accuracy: the paired "
    "interval of the difference holds 0)."
)
DELTA_COLUMNS = ["delta (points)", "paired 95% CI", "McNemar p", "CIs overlap"]
DELTA_NOTE = (
    "Test top-1 minus the reference's, in points. The paired interval resamples the test images "
    "of both models together; McNemar's exact test asks whether the images only one of them "
    "got right split as evenly as chance would (p < 0.05: unlikely to be noise). Two "
    "leaderboard intervals that overlap say much less. Dense probes' rows compare mIoU and "
    "pixel accuracy; their paired interval resamples test images with all their pixels."
)


BOX_DELTA_NOTE = (
    "Box probes' rows compare AP on the same resamples of the test images (the difference of "
    "the two probes' AP on each), CorLoc image by image."
)


def build_report(
    records: Iterable[Record | Mapping[str, Any]],
    reference: str | None = None,
    *,
    cells: list[Cell] | None = None,
) -> Report:
    """Compute the leaderboard, curves, ranking, timings and reference deltas from records
    (`Record`s, or their dicts of any schema); `cells`: the leaderboard's, where the caller
    computed them from these records already (`leaderboard_cells`)."""
    # agreement records are derived from the leaderboard: made anew, never read back
    recs = [r for r in _as_records(records) if r.kind != "agreement"]
    cells = leaderboard_cells(recs) if cells is None else cells
    agreements = agreement(cells)
    recs += agreement_records(agreements)
    errors = [r for r in recs if r.kind == "error"]
    extracts = [r for r in recs if r.kind == "extract"]
    if not cells and not errors:
        raise ProbekitError(
            "no kNN or probe results among the records; run `probekit triage`, `probekit knn` "
            "or `probekit probe` first."
        )
    models = _first_seen(
        [r.model for r in extracts] + [c.model for c in cells] + [e.model for e in errors]
    )
    tasks = _first_seen(
        [c.task for c in cells if "->" not in c.task] + [c.task for c in cells if "->" in c.task]
    )
    methods = sorted({c.method for c in cells}, key=_column)
    if reference is not None and reference not in models:
        raise ProbekitError(
            f"reference {reference!r} is not among the models: {', '.join(models)}."
        )
    num_layers = {
        r.model: int(r.extra["num_layers"]) for r in extracts if r.extra.get("num_layers")
    }
    timing: dict[str, dict[str, float]] = {}
    for r in recs:
        if r.kind in ("extract", "time"):
            t = timing.setdefault(r.model, {"extract_s": 0.0, "images": 0.0, "eval_s": 0.0})
            if r.kind == "extract":
                t["extract_s"] += float(r.extra.get("seconds") or 0.0)
                t["images"] += float(r.extra.get("images") or 0)
            else:
                t["eval_s"] += float(r.extra.get("seconds") or 0.0)
    return Report(
        recs,
        cells,
        tasks,
        models,
        methods,
        _zscore_ranking(cells, methods, tasks, models),
        _curves(recs, cells, num_layers),
        timing,
        errors,
        reference,
        _deltas(cells, reference) if reference else [],
        _best(cells),
        _first_seen(["top1", *[c.metric for c in cells]]),
        _warnings(recs),
        _costs(extracts),
        agreements,
        gap_flags(cells),
    )


def leaderboard_cells(records: Iterable[Record | Mapping[str, Any]]) -> list[Cell]:
    """The leaderboard's entries alone: kNN as chosen on its selection split, the probes as
    chosen on validation (no report around them)."""
    recs = _as_records(records)
    return _knn_cells(recs) + _probe_cells(recs)


def agreement_records(agreements: Sequence[Agreement]) -> list[Record]:
    """Two records an agreement (`spearman`, `kendall`): method "a vs b", model "-", the
    backbones ranked in extra."""
    out = []
    for a in agreements:
        for metric, value, ci in (
            ("spearman", a.spearman, a.spearman_ci95),
            ("kendall", a.kendall, a.kendall_ci95),
        ):
            src, _, dst = a.task.partition("->")
            out.append(
                Record(
                    "agreement",
                    "-",
                    dst or src,
                    metric=cast(Metric, metric),
                    value=value,
                    split="test",
                    method=f"{a.method_a} vs {a.method_b}",
                    n=len(a.models),
                    train_dataset=src,
                    extra={"models": list(a.models), "ci95": None if ci is None else list(ci)},
                )
            )
    return out


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (cost, accuracy) points no other point beats: none as cheap or cheaper
    and at least as accurate, better in one of the two. Sorted by cost."""
    front = []
    for i, (c, a) in enumerate(points):
        beaten = any(
            (c2 <= c and a2 >= a) and (c2 < c or a2 > a)
            for j, (c2, a2) in enumerate(points)
            if j != i
        )
        if not beaten:
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def cost_points(rep: Report, task: str, method: str) -> list[tuple[str, float, float]]:
    """(model, GMACs, top-1) of every entry of `task`/`method` whose cost is known."""
    out = []
    for model in rep.models:
        cell = rep.cell(task, method, model)
        gmacs = (rep.costs.get(model) or {}).get("gmacs")
        if cell is not None and gmacs:
            out.append((model, float(gmacs), cell.value))
    return out


SIZED = re.compile(r"^(.*) @(\d+)px$")


def resolution_curves(rep: Report, task: str, method: str) -> dict[str, list[tuple[int, float]]]:
    """A sweep's entries (`model @Npx`) of `task`/`method` as (size, top-1) per model."""
    out: dict[str, list[tuple[int, float]]] = {}
    for model in rep.models:
        m = SIZED.match(model)
        cell = rep.cell(task, method, model)
        if m and cell is not None:
            out.setdefault(m[1], []).append((int(m[2]), cell.value))
    return {k: sorted(v) for k, v in out.items() if len(v) > 1}


def _costs(extracts: list[Record]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for r in extracts:
        c = out.setdefault(r.model, {"images_per_s": {}})
        for k in ("img_size", "native_size", "params_m", "gmacs"):
            if r.extra.get(k) is not None:
                c[k] = r.extra[k]
        if r.extra.get("images_per_s"):
            c["images_per_s"][r.dataset] = float(r.extra["images_per_s"])
    return out


def _warnings(recs: list[Record]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for r in recs:
        for text in r.extra.get("warnings") or ():
            said = out.setdefault(r.task, [])
            if str(text) not in said:
                said.append(str(text))
    return out


def _best(cells: list[Cell]) -> set[tuple[str, str, str, str]]:
    """Each leaderboard column's best entry, and every entry not significantly different from
    it on the same test images (exact McNemar test, p >= 0.05). Columns of one entry, or whose
    best has no per-image outcomes, mark nothing."""
    out: set[tuple[str, str, str, str]] = set()
    columns: dict[tuple[str, str, str], list[Cell]] = {}
    for c in cells:
        columns.setdefault((c.task, c.method, c.metric), []).append(c)
    for (task, method, metric), column in columns.items():
        top = max(column, key=lambda c: c.value)
        if len(column) < 2 or top.outcomes is None:
            continue
        out.add((task, method, top.model, metric))
        for c in column:
            if c is top:
                continue
            if metric in (*DENSE_METRICS, *BOX_METRICS):  # the paired interval holds 0
                d = (
                    _dense_delta(c.outcomes, top.outcomes, metric)
                    if metric in DENSE_METRICS
                    else _box_delta(c.outcomes, top.outcomes)
                )
                if d is not None and d[1] <= 0 <= d[2]:
                    out.add((task, method, c.model, metric))
                continue
            p = _paired(c.outcomes, top.outcomes, mcnemar_p)
            if p is not None and p >= 0.05:
                out.add((task, method, c.model, metric))
    return out
