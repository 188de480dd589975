"""One backbone on one dataset: kNN (chosen by leave-one-out), every probe method, and the
transfers to other datasets; failures become records."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from probekit import distributed
from probekit.cache.store import FeatureStore, open_store
from probekit.datasets import Dataset
from probekit.errors import ProbekitError
from probekit.evaluation import with_extra
from probekit.extraction import ExtractOptions, extract
from probekit.fewshot import fewshot_methods
from probekit.methods import PROBE_METHODS
from probekit.metrics import encode_outcomes
from probekit.neighbors import DEFAULT_TEMPERATURE, knn
from probekit.records import Record, RecordKind, select_knn
from probekit.specs import ModelSpec

if TYPE_CHECKING:
    from probekit.report.compute import Cell

__all__ = ["evaluate", "extraction_record", "failure_message", "note", "similarity_records"]


def note(kind: RecordKind, model: str, dataset: str, **fields: Any) -> Record:
    """An extract, time or error line: what it says is in `extra`."""
    return Record(kind, model, dataset, extra=fields)


def failure_message(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return text if isinstance(e, ProbekitError) else f"{type(e).__name__}: {text}"


def extraction_record(
    b: ModelSpec,
    ds: Dataset,
    options: ExtractOptions,
    records: list[Record],
    say: Callable[[str], None],
) -> FeatureStore:
    res = extract(b, ds, options=options)
    store = open_store(res.store_path)
    meta = store.meta
    # a cache hit reports the time of the extraction that made the store
    seconds = float(meta.get("seconds", res.seconds)) if res.cache_hit else res.seconds
    cost = dict(meta.get("cost") or {})
    size = int(meta["config"]["preprocessing"]["input_size"][-1])
    # the extraction loop's throughput (as the store recorded it): the cost column
    rate = meta.get("images_per_s") if res.cache_hit else res.images_per_s
    records.append(
        note(
            "extract",
            b.label,
            ds.spec,
            backbone=b.name,
            weights=meta["weights"]["source"],
            images=res.images,
            invalid=res.invalid,
            seconds=seconds,
            images_per_s=float(rate) if rate else (res.images / seconds if seconds > 0 else None),
            img_size=int(cost.get("img_size") or size),
            native_size=int(cost.get("native_size") or size),
            params_m=cost.get("params_m"),
            gmacs=cost.get("gmacs"),
            cache_hit=res.cache_hit,
            num_layers=meta["backbone"].get("num_layers"),
            precision=meta["precision"],
            pixels=res.pixels,
            compile_seconds=res.compile_seconds,
            input_size=meta["config"]["preprocessing"]["input_size"],
            store=res.store_path,
        )
    )
    say(f"  {res.summary()}")
    return store


def evaluate(
    b: ModelSpec,
    store: FeatureStore,
    targets: list[FeatureStore],
    methods: list[str],
    ks: Sequence[int],
    features: list[str] | None,
    records: list[Record],
    fewshot: tuple[tuple[int, ...], int] = ((), 5),
    probe_options: Mapping[str, Any] | None = None,
) -> str:
    """kNN (test + selection split) and probes on one store; transfers to `targets`; label-free
    structure; few-shot episodes where `fewshot` = (shots, episodes) names shots;
    `probe_options`: the probe methods' own options by flat name."""
    spec = store.meta["dataset"]["spec"]
    said = []
    # dense probes where the store has masks, box probes where it has boxes; image-label
    # methods where its labels say something (a segmentation dataset's image labels may be
    # all one class)
    dense, boxed = store.mask_shape is not None, bool(store.info.box_counts)
    labelled = len(np.unique(store.labels("train"))) >= 2

    def fits(m: str) -> bool:
        entry = PROBE_METHODS.get(m)
        if entry is not None and (entry.dense or entry.boxes):
            return (entry.dense and dense) or (entry.boxes and boxed)
        return labelled or not (dense or boxed)

    methods = [m for m in methods if fits(m)]
    if "knn" in methods:
        try:
            said.append(_knn_all(store, targets, ks, features, b.label, records))
        except Exception as e:  # the probes may still work
            records.append(note("error", b.label, spec, stage="knn", message=failure_message(e)))
            said.append(f"kNN FAILED: {failure_message(e)}")
    probe_methods = [m for m in methods if m in PROBE_METHODS]
    # image-label probes, then dense ones, then box ones: one failing leaves the others
    for group, stage in (
        (
            [m for m in probe_methods if not (PROBE_METHODS[m].dense or PROBE_METHODS[m].boxes)],
            "probe",
        ),
        ([m for m in probe_methods if PROBE_METHODS[m].dense], "dense probe"),
        ([m for m in probe_methods if PROBE_METHODS[m].boxes], "box probe"),
    ):
        if not group or not distributed.current().is_main:
            continue
        try:
            said.append(
                _probe_all(store, targets, group, features, b.label, records, probe_options)
            )
        except Exception as e:
            records.append(note("error", b.label, spec, stage=stage, message=failure_message(e)))
            said.append(f"{stage}s FAILED: {failure_message(e)}")
    if "test" in store.splits and labelled and distributed.current().is_main:
        try:  # label-free and cluster metrics of every evaluated feature: cheap on the cache
            from probekit.structure import structure

            names = [f for f in features if store.has_feature(f)] if features else None
            got = structure(store, features=names)
            records += [replace(r, model=b.label) for r in got.records]
        except Exception as e:
            records.append(
                note("error", b.label, spec, stage="structure", message=failure_message(e))
            )
    shots, episodes = fewshot
    few_methods = [m for m in methods if m in fewshot_methods()]
    if shots and few_methods and distributed.current().is_main:
        try:
            said.append(_fewshot(store, shots, episodes, few_methods, b.label, records))
        except Exception as e:
            records.append(
                note("error", b.label, spec, stage="fewshot", message=failure_message(e))
            )
            said.append(f"few-shot FAILED: {failure_message(e)}")
    return ", ".join(said)


def _fewshot(
    store: FeatureStore,
    shots: tuple[int, ...],
    episodes: int,
    methods: list[str],
    label: str,
    records: list[Record],
) -> str:
    """Few-shot episodes on the feature this store's first probe (else kNN) chose."""
    from probekit.fewshot import fewshot

    spec = store.meta["dataset"]["spec"]
    chosen = {
        r.method: r.feature
        for r in records
        if r.model == label
        and r.dataset == spec
        and r.metric == "top1"
        and r.split == "test"
        and r.kind in ("probe", "knn")
        and r.train_dataset in ("", spec)
    }
    feature = next((chosen[m] for m in ("logreg", "linear", "knn") if m in chosen), None)
    if feature is not None and not store.has_feature(feature):
        feature = None
    res = fewshot(
        store, shots=shots, episodes=episodes, methods=methods, feature=feature, write=False
    )
    records += [replace(r, model=label) for r in res.records]
    top = max(shots)
    best = max(r.value for r in res.records if r.hyper["shots"] == top)
    return f"few-shot {top}-shot {100 * best:.1f}"


def similarity_records(
    stores: list[tuple[str, FeatureStore]],
    cells: Sequence[Cell],
    methods: list[str],
    concat: bool = False,
) -> list[Record]:
    """CKA and mutual kNN between the backbones evaluated on one dataset, each by the feature
    its entry of the first method uses (the leaderboard's `cells`); with `concat`, a logistic
    regression on each pair's features side by side against each alone."""
    from probekit.similarity import compare

    if len(stores) < 2:
        return []
    spec = stores[0][1].meta["dataset"]["spec"]
    chosen = []
    for label, store in stores:
        mine = {c.method: c.feature for c in cells if c.task == spec and c.model == label}
        feature = next((mine[m] for m in methods if m in mine and store.has_feature(mine[m])), None)
        if feature is not None:
            chosen.append((label, store, feature))
    if len(chosen) < 2:
        return []
    res = compare(
        [s for _, s, _ in chosen],
        features_of=[[f] for _, _, f in chosen],
        labels=[label for label, _, _ in chosen],
        concat=concat,
    )
    return res.records()


# kNN's feature, k and vote are chosen on at most this many queries of the selection split
SELECTION_QUERIES = 20_000


def _knn_all(
    store: FeatureStore,
    targets: list[FeatureStore],
    ks: Sequence[int],
    features: list[str] | None,
    label: str,
    records: list[Record],
) -> str:
    # k beyond a small database is capped (leave-one-out leaves n - 1 neighbours)
    n_db = int(store.valid("train").sum()) if "train" in store.splits else 0
    ks = sorted({min(int(k), max(1, n_db - 1)) for k in ks})
    test = knn(store, ks=ks, features=features)
    out = [replace(r, model=label) for r in test.records]
    if {"query", "gallery"} <= set(store.splits):  # retrieval: nothing to choose
        records += out
        return "kNN retrieval"
    sel_split = "val" if "val" in store.splits else "train"
    # leave-one-out on train: a sample of queries chooses as well as all of them, at a fraction
    # of a large split's cost (every query searches the whole split)
    sel = knn(store, ks=ks, features=features, test_split=sel_split, max_queries=SELECTION_QUERIES)
    sel_recs = [r for r in sel.records if r.metric == "top1"]
    out += [replace(r, model=label) for r in sel_recs]
    best = select_knn(sel_recs)
    config = (best.feature, best.hyper["k"], best.hyper["vote"])
    at = next(
        i
        for i, r in enumerate(test.records)
        if r.metric == "top1" and (r.feature, r.hyper["k"], r.hyper["vote"]) == config
    )
    # the chosen configuration's hits image by image: paired comparisons between models
    assert test.queried is not None
    outcomes = encode_outcomes(test.queried, test.right[config], store.fingerprint)
    out[at] = with_extra(out[at], outcomes=outcomes)
    for t in targets:
        out += _knn_transfer(store, t, best, label)
    records += out
    k = best.hyper["k"]
    return f"kNN {100 * test.records[at].value:.1f} ({best.feature}, k={k})"


def _probe_all(
    store: FeatureStore,
    targets: list[FeatureStore],
    methods: list[str],
    features: list[str] | None,
    label: str,
    records: list[Record],
    probe_options: Mapping[str, Any] | None = None,
) -> str:
    from probekit.probes import probe

    spec = store.meta["dataset"]["spec"]
    entry = PROBE_METHODS[methods[0]]  # a group of image-label, dense or box probes
    # dense and box probes are tested on the store's own test split (no transfer targets)
    spatial = entry.dense or entry.boxes
    res = probe(
        store,
        method=",".join(methods),
        features=features,
        eval_on=[] if spatial else targets,
        **dict(probe_options or {}),
    )
    records += [replace(r, model=label) for r in res.records]
    said = []
    metric, name = (
        ("miou", "mIoU ") if entry.dense else ("ap50", "AP50 ") if entry.boxes else ("top1", "")
    )
    for m in methods:
        v = next(
            r.value
            for r in res.records
            if r.method == m and r.metric == metric and r.dataset == spec
        )
        said.append(f"{m} {name}{100 * v:.1f} ({res.selected[m]['feature']})")
    return ", ".join(said)


def _knn_transfer(src: FeatureStore, dst: FeatureStore, best: Record, label: str) -> list[Record]:
    """kNN of the target's test images against the source's train split, with the source's
    chosen feature, k and vote; classes are matched by name."""
    name = best.feature
    missing = sorted(set(dst.class_names) - set(src.class_names))
    if missing or not dst.has_feature(name):
        raise ProbekitError(
            f"cannot transfer to {dst.meta['dataset']['spec']}: "
            + (f"classes {missing[:5]} are not in the source" if missing else f"no {name}")
        )
    ids = {c: i for i, c in enumerate(src.class_names)}
    sv, dv = src.valid("train"), dst.valid("test")
    dst_y = np.array([ids[dst.class_names[t]] for t in dst.labels("test")[dv]], dtype=np.int64)
    res = knn(
        (
            src.features("train", name)[sv],
            src.labels("train")[sv],
            dst.features("test", name)[dv],
            dst_y,
        ),
        ks=[best.hyper["k"]],
        temperature=best.hyper.get("temperature") or DEFAULT_TEMPERATURE,
        vote_method=best.hyper["vote"],
        write=False,
    )
    meta = src.meta
    out = []
    for r in res.records:
        if r.metric not in ("top1", "top5", "balanced_accuracy"):
            continue
        extra: dict[str, Any] = {**r.extra, "selected_on": "leave-one-out on source train"}
        if r.metric == "top1":
            right = res.right[(r.feature, r.hyper["k"], r.hyper["vote"])]
            extra["outcomes"] = encode_outcomes(dv, right, dst.fingerprint)
        out.append(
            replace(
                r,
                model=label,
                backbone=meta["backbone"]["name"],
                weights=meta["weights"]["source"],
                train_dataset=meta["dataset"]["spec"],
                dataset=dst.meta["dataset"]["spec"],
                split="test",
                feature=name,
                extra=extra,
            )
        )
    return out
