"""One typed schema for every result line: `Record` (kNN, probe, extraction, timing, failure),
with the rules that decide what a leaderboard shows living here alone (`select_knn`).

A record is one number (`metric`, `value`) of one model on one dataset split, by one method on
one feature, with its hyperparameters; JSON Lines of `Record.to_dict()` are what stores,
triages and reports write. `Record.from_dict` also reads the shapes written before the schema
(`*.knn-*.jsonl`, `*.probe-*.jsonl`, triage journals and `results.jsonl`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, cast, get_args

from probekit.errors import ProbekitError, ProbekitWarning, StoreError
from probekit.specs import model_label

__all__ = [
    "METRICS",
    "RECORD_KINDS",
    "RECORD_SCHEMA",
    "SELECTION_SPLITS",
    "Metric",
    "Record",
    "RecordKind",
    "select_knn",
    "write_records",
]

# 2: one flat shape for every kind (feature, hyper); 1 (or none): KnnRecord / ProbeRecord dicts
RECORD_SCHEMA = 2
# kNN's configuration is chosen on a val split, else by leave-one-out on train
SELECTION_SPLITS = ("val", "train")

# what a record is a result of: an evaluation (knn, probe, fewshot, structure, compare,
# agreement) or a note of the run (extract, time, error, note)
RecordKind = Literal[
    "knn",
    "probe",
    "fewshot",
    "structure",
    "compare",
    "agreement",
    "extract",
    "time",
    "error",
    "note",
]
# every metric a record holds ("" for notes): classification, probes' selection and
# calibration, dense, retrieval (at RETRIEVAL_KS), label-free structure, similarity, agreement
Metric = Literal[
    "",
    "top1",
    "top5",
    "balanced_accuracy",
    "worst_class_accuracy",
    "per_class",
    "val_top1",
    "train_top1",
    "ece",
    "ece_ts",
    "miou",
    "pixel_acc",
    "val_miou",
    "mAP",
    "mAP@R",
    "MRR",
    "precision@1",
    "precision@5",
    "precision@10",
    "recall@1",
    "recall@5",
    "recall@10",
    "rankme",
    "nmi",
    "ari",
    "cka",
    "mutual_knn",
    "concat_gain",
    "spearman",
    "kendall",
    "ap",
    "ap50",
    "ap75",
    "ap_small",
    "ap_medium",
    "ap_large",
    "voc07_ap50",
    "voc_ap50",
    "val_ap",
    "corloc",
    "val_corloc",
    "logme",
    "hscore",
    "params",
]
RECORD_KINDS: tuple[str, ...] = get_args(RecordKind)
METRICS: tuple[str, ...] = get_args(Metric)


@dataclass(frozen=True)
class Record:
    """One result line.

    kind (`RecordKind`, checked): knn, probe (a fitted probe method), fewshot, structure,
    compare, agreement; extract, time, error and note. metric (`Metric`, checked). model:
    the label it goes by (`name`, `name@random`, `name@file`). dataset: what was evaluated;
    train_dataset: what the probe or kNN database came from (differs for a transfer).
    feature: `layer<i>/<pool>`, `head/embed` or `lastN/<pool>`. method: knn, linear,
    logreg, ... hyper: the method's hyperparameters (kNN: k, vote, temperature; probes: the
    configuration chosen on validation). extra: anything else (intervals, per-image
    outcomes, per-class accuracy).
    """

    kind: RecordKind
    model: str
    dataset: str
    metric: Metric = ""
    value: float = math.nan
    split: str = ""
    feature: str = ""
    method: str = ""
    n: int = 0
    train_dataset: str = ""
    backbone: str = ""
    weights: str = ""
    hyper: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in RECORD_KINDS:
            raise ProbekitError(
                f"a record of kind {self.kind!r}: probekit writes {', '.join(RECORD_KINDS)}."
            )
        if self.metric not in METRICS:
            raise ProbekitError(
                f"a record of metric {self.metric!r}: probekit writes {', '.join(METRICS[1:])}."
            )

    @property
    def layer(self) -> str:
        return self.feature.partition("/")[0]

    @property
    def pool(self) -> str:
        return self.feature.partition("/")[2]

    @property
    def task(self) -> str:
        """The dataset, or `source->target` for a transfer."""
        src = self.train_dataset or self.dataset
        return self.dataset if src == self.dataset else f"{src}->{self.dataset}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": RECORD_SCHEMA,
            "kind": self.kind,
            "model": self.model,
            "backbone": self.backbone,
            "weights": self.weights,
            "train_dataset": self.train_dataset or self.dataset,
            "dataset": self.dataset,
            "split": self.split,
            "feature": self.feature,
            "method": self.method,
            "metric": self.metric,
            "value": self.value,
            "n": self.n,
            "hyper": dict(self.hyper),
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Record:
        """A record of this schema, or of the shapes written before it (schema 1)."""
        if not isinstance(d, Mapping):
            raise ProbekitError(f"a record is a JSON object, not {type(d).__name__}.")
        schema = d.get("schema", 1)
        if schema == RECORD_SCHEMA:
            known = {f.name: d[f.name] for f in fields(cls) if f.name in d}
            return cls(**known)
        if schema != 1:
            raise ProbekitError(
                f"record schema {schema} is newer than this probekit reads ({RECORD_SCHEMA}); "
                "upgrade probekit."
            )
        return _from_v1(dict(d))


def _kind_v1(d: Mapping[str, Any]) -> str:
    if "kind" in d:
        return str(d["kind"])
    if "k" in d and "vote" in d:
        return "knn"
    if "method" in d:
        return "probe"
    raise ProbekitError(f"not a probekit record (no kind, kNN or probe fields): {sorted(d)}.")


def _from_v1(d: dict[str, Any]) -> Record:
    """KnnRecord / ProbeRecord dicts (with triage's kind and model added, or not), and the
    extract, time and error lines of triages before the schema."""
    kind = _kind_v1(d)
    if kind not in ("knn", "probe"):  # extract, time, error: every other field is extra
        rest = {k: v for k, v in d.items() if k not in ("kind", "model", "dataset")}
        model, dataset = str(d.get("model", "?")), str(d.get("dataset", ""))
        return Record(cast(RecordKind, kind), model, dataset, extra=rest)  # checked when made
    model = d.get("model") or model_label(str(d["backbone"]), str(d["weights"]))
    common = dict(
        model=str(model),
        dataset=str(d["dataset"]),
        train_dataset=str(d.get("train_dataset") or d["dataset"]),
        split=str(d["split"]),
        feature=f"{d['layer']}/{d['pool']}",
        metric=str(d["metric"]),
        value=float(d["value"]),
        n=int(d["n"]),
        backbone=str(d["backbone"]),
        weights=str(d["weights"]),
    )
    extra = dict(d.get("extra") or {})
    if kind == "knn":
        if "backend" in d:
            extra["backend"] = d["backend"]
        hyper = {"k": d["k"], "vote": d["vote"], "temperature": d.get("temperature")}
        return Record("knn", method="knn", hyper=hyper, extra=extra, **common)  # type: ignore[arg-type]
    return Record(
        "probe",
        method=str(d["method"]),
        hyper=dict(d.get("config") or {}),
        extra=extra,
        **common,  # type: ignore[arg-type]
    )


def write_records(
    store_path: Any,
    kind: str,
    config: Any,
    records: Iterable[Record],
    out: str | os.PathLike[str] | None = None,
) -> str | None:
    """Records as JSON Lines next to a store (or in directory `out`), written atomically;
    return the file's path, or None (with a warning) where the store's directory is read-only
    and no `out` was given.

    The file is `<store>.<kind>-<hash of config>.jsonl`: a rerun with the same settings
    replaces its own file, other settings get their own. A write that fails (a full disk)
    leaves no temporary file and is a one-line error.
    """
    from probekit.cache.location import is_remote, location, writable

    tag = hashlib.sha256(json.dumps(config, default=str).encode()).hexdigest()[:8]
    name = f"{store_path.stem}.{kind}-{tag}.jsonl"
    folder = store_path.parent if out is None else location(out)
    if out is None and not writable(folder):
        warnings.warn(
            f"{folder} is read-only: the {kind} records were not written; pass --out DIR "
            "(out=) to keep them.",
            ProbekitWarning,
            stacklevel=3,
        )
        return None
    path = folder / name
    text = "".join(json.dumps(r.to_dict()) + "\n" for r in records)
    if is_remote(path):  # an object is written whole or not at all
        path.write_text(text)
        return str(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise StoreError(
            f"cannot write the {kind} records to {path}: {e.strerror or e}; free space, or "
            "pass --out DIR (out=) on another disk, and run again."
        ) from None
    return str(path)


def select_knn(candidates: Iterable[Record]) -> Record:
    """kNN's configuration (feature, k, vote) from its selection records: the best top-1 on the
    selection split; among equals the smaller k, then the first listed."""
    recs = list(candidates)
    if not recs:
        raise ProbekitError("no kNN selection records to choose from.")
    return max(recs, key=lambda r: (r.value, -int(r.hyper["k"])))
