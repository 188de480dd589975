"""`probe`: the stage every probe method shares. The data is read once (`ProbeData`), each
method of the registry selects on validation, and the one evaluation on test (and on transfer
targets) scores every selection: top-1 with its interval, top-5, balanced accuracy, train
top-1 and calibration."""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import numpy as np
import torch

from probekit.cache.store import FeatureStore, open_for_reading, open_store
from probekit.errors import ProbekitError
from probekit.evaluation import check_labels, classification_records, warned
from probekit.methods import PROBE_METHODS
from probekit.metrics import (
    expected_calibration_error,
    fit_temperature,
    reliability_bins,
)
from probekit.probes.base import ProbeData, ProbeOptions, Selection, ranked_classes
from probekit.records import Metric, Record, write_records

__all__ = ["ProbeRecord", "ProbeResult", "calibration_records", "probe"]

# a probe's result line is a `Record` (kind "probe", hyper: the configuration chosen)
ProbeRecord = Record


@dataclass(frozen=True)
class ProbeResult:
    """Every record of one `probe` call; `selected[method]` is the winning configuration."""

    records: list[Record]
    selected: dict[str, dict[str, Any]]
    path: str | None = None

    def value(self, metric: str, *, method: str, split: str | None = None) -> float:
        hits = [
            r
            for r in self.records
            if r.metric == metric and r.method == method and (split is None or r.split == split)
        ]
        if len(hits) != 1:
            raise ProbekitError(f"{len(hits)} records match {metric} {method} {split}.")
        return hits[0].value

    def table(self) -> list[list[str]]:
        """Header and rows: each method's chosen probe on each evaluated dataset (test top-1
        with its interval, top-5, balanced accuracy) beside what validation chose."""
        out = [
            [
                "method",
                "feature",
                "chosen on validation",
                "val top-1",
                "dataset",
                "test top-1 [95% CI]",
                "top-5",
                "balanced",
                "train top-1",
                "ECE (scaled)",
            ]
        ]
        for m, cfg in self.selected.items():
            if PROBE_METHODS[m].dense or PROBE_METHODS[m].boxes:
                continue  # `dense_table`, `box_table`
            hyper = ", ".join(
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in cfg.items()
                if k not in ("feature", "val_top1")
            )
            rec = {(r.metric, r.dataset): r for r in self.records if r.method == m}
            train = next(r for r in self.records if r.method == m and r.metric == "train_top1")
            for (metric, dataset), r in rec.items():
                if metric != "top1":
                    continue
                lo, hi = r.extra["ci95"]
                out.append(
                    [
                        m,
                        str(cfg["feature"]),
                        hyper,
                        f"{100 * cfg['val_top1']:.2f}",
                        dataset,
                        f"{100 * r.value:.2f} [{100 * lo:.1f}, {100 * hi:.1f}]",
                        f"{100 * rec[('top5', dataset)].value:.2f}",
                        f"{100 * rec[('balanced_accuracy', dataset)].value:.2f}",
                        f"{100 * train.value:.2f}"
                        + (" (underfit)" if train.extra["underfit"] else ""),
                        _ece_text(rec.get(("ece", dataset)), rec.get(("ece_ts", dataset))),
                    ]
                )
        return out

    def box_table(self) -> list[list[str]]:
        """Header and rows: each box method's chosen head (test COCO AP, AP50, AP75 with their
        intervals over images, AP small / medium / large) beside what validation chose, and
        the training-free CorLoc."""
        out = [
            [
                "method",
                "feature",
                "chosen on validation",
                "val AP",
                "AP [95% CI]",
                "AP50 [95% CI]",
                "AP75",
                "AP S / M / L",
                "CorLoc (layer)",
            ]
        ]
        for m, cfg in self.selected.items():
            if not PROBE_METHODS[m].boxes:
                continue
            hyper = _hyper_text(cfg, PROBE_METHODS[m].shown)
            rec: dict[str, Record] = {
                r.metric: r for r in self.records if r.method == m and r.split != "val"
            }
            sizes = " / ".join(_pct(rec, k) for k in ("ap_small", "ap_medium", "ap_large"))
            loc = rec.get("corloc")
            corloc = f"{_pct(rec, 'corloc', True)} ({loc.feature})" if loc is not None else "-"
            out.append(
                [
                    m,
                    str(cfg["feature"]),
                    hyper,
                    f"{100 * cfg['val_ap']:.2f}",
                    _pct(rec, "ap", True),
                    _pct(rec, "ap50", True),
                    _pct(rec, "ap75"),
                    sizes,
                    corloc,
                ]
            )
        return out

    def dense_table(self) -> list[list[str]]:
        """Header and rows: each dense method's chosen probe (test mIoU and pixel accuracy
        with their intervals over images) beside what validation chose."""
        out = [
            [
                "method",
                "feature",
                "chosen on validation",
                "val mIoU",
                "test mIoU [95% CI]",
                "pixel acc [95% CI]",
            ]
        ]
        for m, cfg in self.selected.items():
            if not PROBE_METHODS[m].dense:
                continue
            hyper = _hyper_text(cfg, PROBE_METHODS[m].shown)
            rec = {r.metric: r for r in self.records if r.method == m and r.split != "val"}
            cells = []
            for metric in ("miou", "pixel_acc"):
                r = rec[metric]
                lo, hi = r.extra["ci95"]
                cells.append(f"{100 * r.value:.2f} [{100 * lo:.1f}, {100 * hi:.1f}]")
            out.append([m, str(cfg["feature"]), hyper, f"{100 * cfg['val_miou']:.2f}", *cells])
        return out


def _ece_text(ece: Record | None, scaled: Record | None) -> str:
    if ece is None or scaled is None:
        return "-"
    return f"{100 * ece.value:.1f} ({100 * scaled.value:.1f})"


def probe(
    source: FeatureStore | str | os.PathLike[str],
    *,
    eval_on: Sequence[FeatureStore | str | os.PathLike[str]] = (),
    options: ProbeOptions | None = None,
    **changes: Any,
) -> ProbeResult:
    """Train probes on every stored feature and report the one chosen on validation data.

    linear: G = features x lrs x wds heads trained together on each minibatch (one batched
    matmul), epoch and head chosen on validation accuracy. logreg: multinomial L2 logistic
    regression by L-BFGS along the C path (warm starts), C and feature chosen on validation,
    then refit on train + validation. The chosen probe is evaluated once on `test_split`, and
    on the test splits of the `eval_on` stores (transfer; same class names needed).
    `options` and keyword `changes`: the shared fields of `ProbeOptions` (method, features,
    holdout, seed, epochs, batch_size, dtype, device, memory_mb, allow_partial, test_split,
    write, out) and each method's own by its flat name (lrs, wds, optimizer, cs, tol, attn_lrs,
    seg_epochs, dense_ks, ...: `ProbeOptions.names()`), each checked before any work.
    Features are held on the device when they fit `memory_mb` (default: half the free
    memory), else streamed.
    """
    opts = ProbeOptions.of(options, **changes)
    store = open_for_reading(source, allow_partial=opts.allow_partial)
    dense = [m for m in opts.methods if PROBE_METHODS[m].dense]
    boxes = [m for m in opts.methods if PROBE_METHODS[m].boxes]
    flat = [m for m in opts.methods if m not in dense and m not in boxes]
    if (dense or boxes) and eval_on:
        raise ProbekitError(
            "dense and box probes (linseg, dense-knn, detect) have no transfer evaluation yet."
        )
    data = ProbeData.prepare(store, replace(opts, method=flat)) if flat else None
    targets = [o if isinstance(o, FeatureStore) else open_store(o) for o in eval_on]
    selections = [PROBE_METHODS[m].select()(data, opts.of_method(m)) for m in flat]
    info = store.info
    base = Record(
        "probe",
        info.label,
        info.dataset.spec,
        train_dataset=info.dataset.spec,  # kept when `dataset` is a transfer target
        backbone=info.backbone.name,
        weights=info.weights_source,
    )
    base = warned(base, data.warnings if data else info.dataset.warnings, info.dataset.spec)
    # validation accuracy of every feature's best probe (what selection saw): layer curves
    records = [
        replace(
            base,
            split="val",
            feature=name,
            method=sel.method,
            metric="val_top1",
            value=float(acc) if math.isfinite(float(acc)) else math.nan,  # diverged: none
            n=len(data.val_y) if data else 0,
            hyper=cfg,
        )
        for sel in selections
        for name, cfg, acc in sel.curve
    ]
    for sel in selections:
        assert data is not None
        records += _evaluate(sel, data, targets, base)
    selected = {s.method: s.config for s in selections}
    token_recs, token_selected = _token_records(store, opts, dense, boxes, base)
    records += token_recs
    selected.update(token_selected)
    path = None
    if opts.write:
        config = {
            **opts.to_dict(),
            "features": data.names if data else list(opts.features or store.token_names),
            "eval_on": [str(getattr(o, "path", o)) for o in eval_on],
        }
        path = write_records(store.path, "probe", config, records, opts.out)
    return ProbeResult(records, selected, path)


def _token_records(
    store: FeatureStore,
    opts: ProbeOptions,
    dense: Sequence[str],
    boxes: Sequence[str],
    base: Record,
) -> tuple[list[Record], dict[str, dict[str, Any]]]:
    """The dense methods' and the box methods' records, and what each chose."""
    records: list[Record] = []
    selected: dict[str, dict[str, Any]] = {}
    for methods, stage in (
        (dense, "probekit.dense.data:dense_records"),
        (boxes, "probekit.detection.records:detection_records"),
    ):
        if methods:
            module, _, name = stage.partition(":")
            recs, chosen = getattr(importlib.import_module(module), name)(
                store, opts, methods, base
            )
            records += recs
            selected.update(chosen)
    return records, selected


def _evaluate(
    sel: Selection, data: ProbeData, targets: Sequence[FeatureStore], base: Record
) -> list[Record]:
    """The only place the test split is read: the chosen probe's train top-1 (and whether it
    underfits), then its metrics on test and on every transfer target."""
    store, f, cfg = data.store, sel.feature, sel.config
    split = data.options.test_split
    evals = [(store, base.dataset)]
    for other in targets:
        _check_transfer(store, other, f.name)
        evals.append((other, other.info.dataset.spec))
    at = replace(base, feature=f.name, method=sel.method, hyper=cfg)
    with torch.no_grad():
        train_top1 = sel.train_top1()
        # temperature scaling, fitted on validation logits of a classifier that never saw
        # those rows (logreg: its solution before the refit on train + validation)
        val_logits = sel.val_logits
        if val_logits is None:
            val_rows = sel.rows(store, data.val_split, data.val_rows, data.budget)
            val_logits = sel.all_logits(val_rows)
        temperature = fit_temperature(val_logits, data.val_y.cpu().numpy())
        # underfitting: the probe fits its own training data hardly better than held-out data
        underfit = train_top1 < 0.95 and train_top1 - cfg["val_top1"] < 0.02
        records = [
            replace(
                at,
                split="train",
                metric="train_top1",
                n=len(sel.train_y),
                value=train_top1,
                extra={"underfit": underfit},
            )
        ]
        for st, spec in evals:
            usable = st.usable(split)
            rows = np.flatnonzero(usable)
            x = sel.rows(st, split, rows, data.budget)
            y = st.labels(split)[rows]
            if st is not store:  # map the other store's class ids onto ours by name
                ids = {c: i for i, c in enumerate(store.class_names)}
                y = np.array([ids[st.class_names[t]] for t in y], dtype=np.int64)
            # test classes the probe never saw in training cap the score: said, with counts
            seen = np.concatenate([data.fit_y.cpu().numpy(), data.val_y.cpu().numpy()])
            absent = check_labels(seen, y, store.class_names, who="a probe")
            logits = sel.all_logits(x)
            ranked = ranked_classes(logits)
            split_at = warned(replace(at, dataset=spec, split=split), absent, spec)
            recs, _ = classification_records(
                ranked,
                y,
                data.n_classes,
                split_at,
                seed=data.options.seed,
                scored=usable,
                fingerprint=st.fingerprint,
            )
            records += recs + calibration_records(
                logits, y, temperature, replace(split_at, n=len(y)), sel.config.get("refit")
            )
    return records


def _hyper_text(cfg: Mapping[str, Any], shown: Sequence[str]) -> str:
    """The chosen hyperparameters a table shows ("lr=0.001, wd=0.0001, epoch=9")."""
    return ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in cfg.items() if k in shown
    )


def _pct(rec: Mapping[str, Record], metric: str, ci: bool = False) -> str:
    """A metric's value in percent (with its interval), "-" where it is absent or NaN."""
    r = rec.get(metric)
    if r is None or r.value != r.value:
        return "-"
    bounds = r.extra.get("ci95") if ci else None
    said = f"{100 * r.value:.2f}"
    return said + (f" [{100 * bounds[0]:.1f}, {100 * bounds[1]:.1f}]" if bounds else "")


def calibration_records(
    logits: np.ndarray, y: np.ndarray, temperature: float, at: Record, refit: str | None
) -> list[Record]:
    """ECE (15 bins) of the probe's softmax on these rows, before (`ece`) and after (`ece_ts`)
    temperature scaling by `temperature`, each with its reliability diagram's bins."""
    out = []
    for metric, t in (("ece", 1.0), ("ece_ts", temperature)):
        conf, acc, count = reliability_bins(logits / t, y)
        bins = {
            "confidence": [None if np.isnan(v) else float(v) for v in conf],
            "accuracy": [None if np.isnan(v) else float(v) for v in acc],
            "count": [int(v) for v in count],
        }
        extra: dict[str, Any] = {**at.extra, "temperature": t, "bins": bins}
        if metric == "ece_ts" and refit:
            extra["temperature_fit_on"] = f"validation, by the solution before the {refit} refit"
        out.append(
            replace(
                at,
                metric=cast(Metric, metric),
                value=expected_calibration_error(logits / t, y),
                extra=extra,
            )
        )
    return out


def _check_transfer(src: FeatureStore, dst: FeatureStore, name: str) -> None:
    missing = sorted(set(dst.class_names) - set(src.class_names))
    if missing:
        raise ProbekitError(
            f"cannot evaluate on {dst.info.dataset.spec}: classes {missing[:5]} are not "
            "among the probe's training classes."
        )
    held = name in dst.token_names or dst.has_feature(name)
    if not held or not src.info.same_model(dst.info):
        raise ProbekitError(
            f"cannot evaluate on {dst.path.name}: it does not hold feature {name!r} of the same "
            "backbone and weights; extract it with the same options."
        )
