"""`probekit triage`: every backbone x dataset through extract, kNN and probes, into one report."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from probekit import distributed
from probekit.backbones import DEFAULT_LAYERS
from probekit.cache.store import FeatureStore, open_store
from probekit.data import Dataset, load_dataset
from probekit.errors import OptionError, ProbekitError
from probekit.evaluation import with_extra
from probekit.extraction import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_POOLS,
    ExtractOptions,
    Geometry,
    extract,
    geometry_transform,
)
from probekit.methods import METHODS, PROBE_METHODS, all_methods
from probekit.metrics import encode_outcomes
from probekit.neighbors import DEFAULT_KS, DEFAULT_TEMPERATURE, knn
from probekit.records import Record, select_knn
from probekit.report import Report, build_report, write_report
from probekit.specs import ModelSpec, as_ints, parse_list, parse_models

__all__ = [
    "TriageResult",
    "parse_transfers",
    "triage",
]


def parse_transfers(spec: str | Sequence[str] | None) -> list[tuple[str, str]]:
    """`SRC->DST` pairs: probes trained on SRC's train split, tested on DST's test split."""
    out = []
    for item in parse_list(spec, "transfer"):
        src, sep, dst = item.partition("->")
        if not sep or not src.strip() or not dst.strip():
            raise OptionError(f"transfer {item!r}: write SOURCE->TARGET, e.g. 'mnist5k->digits'.")
        out.append((src.strip(), dst.strip()))
    return out


@dataclass(frozen=True)
class TriageResult:
    """What a triage did: every record, the report built from them, and the files written."""

    report: Report
    files: dict[str, str]
    out_dir: str

    @property
    def records(self) -> list[Record]:
        return self.report.records


def _record(kind: str, model: str, dataset: str, **fields: Any) -> Record:
    """An extract, time or error line: what it says is in `extra`."""
    return Record(kind, model, dataset, extra=fields)


def triage(
    backbones: str | Sequence[str],
    data: str | Sequence[str],
    *,
    transfer: str | Sequence[str] | None = None,
    methods: str | Sequence[str] = METHODS,
    layers: str | Sequence[int] = DEFAULT_LAYERS,
    pool: str | Sequence[str] = DEFAULT_POOLS,
    img_size: int | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    features: str | Sequence[str] | None = None,
    reference: str | None = None,
    out: str | os.PathLike[str] = "probekit-report",
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "auto",
    precision: str = "auto",
    pixel_cache: bool | None = None,
    pixel_size: int | str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    plots: bool = True,
    quiet: bool = False,
    log: Callable[[str], None] | None = print,
) -> TriageResult:
    """Extract (cache-aware), kNN-evaluate and probe every backbone on every dataset; report.

    `backbones`: NAME, NAME@random or NAME@WEIGHTS_FILE (comma list). `features`: what kNN
    and the probes evaluate (default: every stored feature), e.g. "last4/cls,head/embed":
    names every backbone has (`lastN/POOL` concatenates its last N layers). `transfer`: SRC->DST
    pairs; SRC must be among `data`, DST is extracted for its test split. A failure of one
    backbone on one dataset becomes a row of the report; the others go on. `pixel_cache`
    (default: on for more than one backbone) decodes each image once per geometry;
    `pixel_size` ("auto": the largest resize among the backbones) once for all of them, each
    backbone's crop cut and resized on the device (see `extract`).
    """
    # under torchrun every rank extracts and searches its share; rank 0 probes and reports
    dist = distributed.init()
    say = (log if dist.is_main else None) or (lambda _: None)
    plan = TriagePlan.resolve(
        backbones,
        data,
        transfer=transfer,
        methods=methods,
        ks=ks,
        features=features,
        reference=reference,
        pixel_cache=pixel_cache,
        pixel_size=pixel_size,
        extract=ExtractOptions(
            layers=layers,
            pool=pool,
            img_size=img_size,
            batch_size=batch_size,
            device=device,
            precision=precision,
            cache_dir=cache_dir,
            quiet=quiet,
        ),
    )
    # evaluations an interrupted run into the same `out` finished are kept, not redone
    journal = None if dist.is_group else _Journal(Path(out).expanduser() / ".progress.jsonl")
    plan.announce(say)
    records: list[Record] = []
    for b in plan.models:
        stores = _extract_all(b, plan, records, say)
        for spec in plan.data_specs:
            if spec in stores:
                _evaluate_one(b, spec, stores, plan, journal, records, say)
    if dist.is_main:
        rep, files = write_report(records, out, reference=plan.reference, plots=plots)
    if dist.is_group:  # every rank returns rank 0's report
        records, files = dist.broadcast((records, files) if dist.is_main else None)
        rep = build_report(records, plan.reference)
    return TriageResult(rep, files, str(Path(out).expanduser()))


@dataclass(frozen=True)
class TriagePlan:
    """A triage decided before it runs: the models, datasets (listed and checked once, up
    front: a bad spec stops before any work), transfers, methods and the extraction options."""

    models: list[ModelSpec]
    data_specs: list[str]
    pairs: list[tuple[str, str]]  # transfers: probes trained on SRC, tested on DST
    methods: list[str]
    ks: list[int]
    features: list[str] | None  # None: every stored feature
    reference: str | None
    datasets: dict[str, Dataset]
    extract: ExtractOptions  # with the pixel cache policy decided

    @classmethod
    def resolve(
        cls,
        backbones: str | Sequence[str],
        data: str | Sequence[str],
        *,
        transfer: str | Sequence[str] | None,
        methods: str | Sequence[str],
        ks: Sequence[int],
        features: str | Sequence[str] | None,
        reference: str | None,
        pixel_cache: bool | None,
        pixel_size: int | str | None,
        extract: ExtractOptions,
    ) -> TriagePlan:
        models = parse_models(backbones)
        data_specs = parse_list(data, "data")
        if not data_specs:
            raise OptionError("no datasets given; e.g. --data imagefolder:PATH,mnist5k.")
        pairs = parse_transfers(transfer)
        for src, _ in pairs:
            if src not in data_specs:
                raise OptionError(f"transfer source {src!r} is not among --data ({data_specs}).")
        wanted = parse_list(methods, "methods")
        known = all_methods()
        bad = [m for m in wanted if m not in known]
        if bad or not wanted:
            raise OptionError(f"unknown methods {bad}; use any of {', '.join(known)}.")
        if reference is not None and reference not in [b.label for b in models]:
            labels = ", ".join(b.label for b in models)
            raise OptionError(f"--reference {reference!r} is not among --backbones ({labels}).")
        datasets: dict[str, Dataset] = {}
        for spec in [*data_specs, *[dst for _, dst in pairs]]:
            if spec not in datasets:
                datasets[spec] = load_dataset(spec)
        for src, dst in pairs:
            if datasets[src].spec == datasets[dst].spec:
                raise OptionError(
                    f"transfer {src}->{dst} is from a dataset to itself ({datasets[src].spec}); "
                    "its test split is already evaluated. Name two datasets, e.g. "
                    "'mnist5k->digits'."
                )
        # the pixel cache pays off as soon as a second backbone reads the same images
        use_pixels = len(models) > 1 if pixel_cache is None else pixel_cache
        side = _pixel_size(pixel_size, models, extract.img_size)
        if side is not None and not use_pixels:
            raise OptionError("pixel_size needs the pixel cache: drop --no-pixel-cache.")
        options = ExtractOptions.of(extract, pixel_cache=use_pixels, pixel_size=side)
        ks_list = [int(k) for k in as_ints(ks, "ks")]
        return cls(
            models,
            data_specs,
            pairs,
            wanted,
            ks_list,
            _names(features),
            reference,
            datasets,
            options,
        )

    def announce(self, say: Callable[[str], None]) -> None:
        """The run's header, and how to decode once where several geometries each decode."""
        say(
            f"triage: {len(self.models)} backbones x {len(self.data_specs)} datasets"
            + (f" + {len(self.pairs)} transfers" if self.pairs else "")
            + f", methods {', '.join(self.methods)}"
        )
        opts = self.extract
        if opts.pixel_cache and opts.pixel_size is None and len(self.models) > 1:
            kinds = {g.describe() for g in _geometries(self.models, opts.img_size)}
            if len(kinds) > 1:  # each geometry decodes the images once: say how to decode once
                say(
                    f"pixel cache: {len(self.models)} backbones, {len(kinds)} geometries, each "
                    "decodes the images once; --pixel-size auto decodes them once for all (each "
                    "backbone's crop cut and resized on the device: close to, not equal to, its "
                    "own resize)"
                )


def _extract_all(
    b: ModelSpec, plan: TriagePlan, records: list[Record], say: Callable[[str], None]
) -> dict[str, FeatureStore]:
    """One backbone's store of every dataset; a failure is a row of the report, not the end."""
    stores: dict[str, FeatureStore] = {}
    for spec, ds in plan.datasets.items():
        try:
            stores[spec] = _extract(b, ds, plan.extract, records, say)
        except Exception as e:  # one backbone's failure is a row, not the end of the run
            records.append(_record("error", b.label, ds.spec, stage="extract", message=_msg(e)))
            say(f"  {b.label} on {ds.spec}: FAILED to extract: {_msg(e)}")
    return stores


def _evaluate_one(
    b: ModelSpec,
    spec: str,
    stores: dict[str, FeatureStore],
    plan: TriagePlan,
    journal: _Journal | None,
    records: list[Record],
    say: Callable[[str], None],
) -> None:
    """kNN and probes of one backbone on one dataset (and its transfers), or what an earlier
    run of the same evaluation kept."""
    targets = [stores[dst] for src, dst in plan.pairs if src == spec and dst in stores]
    key = _journal_key(b.label, stores[spec], targets, plan.methods, plan.ks, plan.features)
    kept = journal.get(key) if journal is not None else None
    if kept is not None:
        records += [Record.from_dict(r) for r in kept["records"]]
        say(f"  {b.label} on {spec}: {kept['lines']} (kept from an earlier run)")
        return
    t0 = time.perf_counter()
    first = len(records)
    try:
        lines = _evaluate(b, stores[spec], targets, plan.methods, plan.ks, plan.features, records)
    except Exception as e:
        records.append(_record("error", b.label, spec, stage="evaluate", message=_msg(e)))
        say(f"  {b.label} on {spec}: FAILED to evaluate: {_msg(e)}")
        return
    secs = time.perf_counter() - t0
    records.append(_record("time", b.label, spec, stage="evaluate", seconds=secs))
    say(f"  {b.label} on {spec}: {lines} ({secs:.1f} s)")
    done = records[first:]
    if journal is not None and not any(r.kind == "error" for r in done):
        journal.add(key, {"records": [r.to_dict() for r in done], "lines": lines})


class _Journal:
    """Finished evaluations of a triage, one JSON line each, appended and synced as they end:
    a rerun into the same report folder keeps them (a torn last line is ignored)."""

    def __init__(self, path: Path):
        self.path = path
        self.done: dict[str, dict[str, Any]] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    self.done[entry["key"]] = entry["value"]
                except (ValueError, KeyError, TypeError):
                    continue  # cut short by a kill

    def get(self, key: str) -> dict[str, Any] | None:
        return self.done.get(key)

    def add(self, key: str, value: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"key": key, "value": value}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[key] = value


def _journal_key(
    label: str,
    store: FeatureStore,
    targets: list[FeatureStore],
    methods: list[str],
    ks: Sequence[int],
    features: list[str] | None,
) -> str:
    """What an evaluation's numbers depend on: model label, the stores (each extraction has its
    own creation time) and the evaluation options."""
    ident = [(s.meta.get("cache_key"), s.meta.get("created")) for s in [store, *targets]]
    options: list[Any] = [methods, sorted(int(k) for k in ks)]
    if features is not None:
        options.append(features)
    blob = json.dumps([label, ident, *options], default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _geometries(specs: Sequence[ModelSpec], img_size: int | None) -> list[Geometry]:
    """Each backbone's preprocessing geometry (backbones that cannot be built are left out:
    their extraction fails on its own, as a row of the report)."""
    out = []
    for b in specs:
        try:
            bb = b.create(img_size=img_size, load=False)
        except ProbekitError:
            continue
        out.append(geometry_transform(dict(bb.data_config)))
    return out


def _pixel_size(
    value: int | str | None, specs: Sequence[ModelSpec], img_size: int | None
) -> int | None:
    """The side of a pixel cache shared by `specs`: as given, or "auto": the largest resize of
    a centre-crop geometry among them (None when none has one)."""
    if value is None or isinstance(value, int):
        return value
    if value.strip().lower() != "auto":
        try:
            return int(value)
        except ValueError:
            raise OptionError(
                f"pixel_size {value!r} is neither a number of pixels nor 'auto'."
            ) from None
    sides = [g.center[0] for g in _geometries(specs, img_size) if g.center is not None]
    return max(sides, default=None)


def _msg(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return text if isinstance(e, ProbekitError) else f"{type(e).__name__}: {text}"


def _extract(
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
    records.append(
        _record(
            "extract",
            b.label,
            ds.spec,
            backbone=b.name,
            weights=meta["weights"]["source"],
            images=res.images,
            invalid=res.invalid,
            seconds=seconds,
            images_per_s=res.images / seconds if seconds > 0 else None,
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


def _evaluate(
    b: ModelSpec,
    store: FeatureStore,
    targets: list[FeatureStore],
    methods: list[str],
    ks: Sequence[int],
    features: list[str] | None,
    records: list[Record],
) -> str:
    """kNN (test + selection split) and probes on one store; transfers to `targets`."""
    spec = store.meta["dataset"]["spec"]
    said = []
    if "knn" in methods:
        try:
            said.append(_knn_all(store, targets, ks, features, b.label, records))
        except Exception as e:  # the probes may still work
            records.append(_record("error", b.label, spec, stage="knn", message=_msg(e)))
            said.append(f"kNN FAILED: {_msg(e)}")
    probe_methods = [m for m in methods if m in PROBE_METHODS]
    if probe_methods and distributed.current().is_main:
        try:
            said.append(_probe_all(store, targets, probe_methods, features, b.label, records))
        except Exception as e:
            records.append(_record("error", b.label, spec, stage="probe", message=_msg(e)))
            said.append(f"probes FAILED: {_msg(e)}")
    return ", ".join(said)


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
) -> str:
    from probekit.probes import probe

    spec = store.meta["dataset"]["spec"]
    res = probe(
        store,
        method="both" if set(methods) == set(PROBE_METHODS) else ",".join(methods),
        features=features,
        eval_on=targets,
    )
    records += [replace(r, model=label) for r in res.records]
    said = []
    for m in methods:
        v = next(
            r.value
            for r in res.records
            if r.method == m and r.metric == "top1" and r.dataset == spec
        )
        said.append(f"{m} {100 * v:.1f} ({res.selected[m]['feature']})")
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


def _names(spec: str | Sequence[str] | None) -> list[str] | None:
    """A comma list (or a sequence) of feature names; None: every stored feature."""
    if spec is None:
        return None
    names = parse_list(spec, "features")
    if not names:
        raise OptionError("features is empty; name features (e.g. last4/cls) or leave it out.")
    return names
