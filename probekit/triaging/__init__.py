"""`probekit triage`: every backbone x dataset through extract, kNN and probes, into one report.

plan.py      TriagePlan: models, datasets, transfers, methods, extraction options
evaluate.py  kNN (chosen by leave-one-out), the probes, transfers: records
journal.py   finished evaluations kept across interruptions
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from probekit import distributed
from probekit.cache.store import FeatureStore
from probekit.defaults import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_IMG_SIZE,
    DEFAULT_KS,
    DEFAULT_LAYERS,
    DEFAULT_POOLS,
)
from probekit.extraction import ExtractOptions
from probekit.methods import METHODS
from probekit.records import Record
from probekit.report import Report, build_report, write_report
from probekit.report.compute import Cell, leaderboard_cells
from probekit.specs import ModelSpec
from probekit.triaging.evaluate import evaluate as _evaluate
from probekit.triaging.evaluate import (
    extraction_record,
    failure_message,
    note,
    similarity_records,
)
from probekit.triaging.journal import Journal, journal_key
from probekit.triaging.plan import TriagePlan, parse_transfers

__all__ = ["TriagePlan", "TriageResult", "parse_transfers", "triage"]


@dataclass(frozen=True)
class TriageResult:
    """What a triage did: every record, the report built from them, and the files written."""

    report: Report
    files: dict[str, str]
    out_dir: str

    @property
    def records(self) -> list[Record]:
        return self.report.records


def triage(
    backbones: str | Sequence[str],
    data: str | Sequence[str],
    *,
    transfer: str | Sequence[str] | None = None,
    methods: str | Sequence[str] = METHODS,
    layers: str | Sequence[int] = DEFAULT_LAYERS,
    pool: str | Sequence[str] = DEFAULT_POOLS,
    img_size: int | str | Sequence[int | str] | None = DEFAULT_IMG_SIZE,
    tokens: str | int | None = None,
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
    shots: Sequence[int] | str | None = None,
    episodes: int = 5,
    concat: bool = False,
    plots: bool = True,
    quiet: bool = False,
    log: Callable[[str], None] | None = print,
    probe_options: Mapping[str, Any] | None = None,
) -> TriageResult:
    """Extract (cache-aware), kNN-evaluate and probe every backbone on every dataset; report.

    `backbones`: NAME, NAME@random or NAME@WEIGHTS_FILE (comma list). `features`: what kNN
    and the probes evaluate (default: every stored feature), e.g. "last4/cls,head/embed":
    names every backbone has (`lastN/POOL` concatenates its last N layers). `transfer`: SRC->DST
    pairs; SRC must be among `data`, DST is extracted for its test split. A failure of one
    backbone on one dataset becomes a row of the report; the others go on. `pixel_cache`
    (default: on for more than one backbone) decodes each image once per geometry;
    `pixel_size` ("auto": the largest resize among the backbones) once for all of them, each
    backbone's crop cut and resized on the device (see `extract`). `img_size`: the evaluation
    resolution of every backbone (default 224: the short side resized to 256, the centre 224
    cropped, each model's own normalization and interpolation), `native` for each model's
    pretrained size, or a list (224,336,448) to run every backbone at each size. `tokens`:
    each layer's patch tokens stored too (all, or a grid side g), what `attentive` reads; with
    `attentive` among the methods it defaults to all. `shots` (e.g. 1,5,10) adds few-shot
    episodes (`episodes` of each, seeded) of kNN, linear and logreg among `methods`, on the
    feature the first probe (else kNN) chose. `concat`: a logistic regression on every pair
    of backbones' features side by side, against each alone (does an ensemble pay?).
    `probe_options`: the probe methods' own options by flat name (`det_epochs`, `seg_lrs`,
    ...: `probekit.methods.method_flags`), checked before any work.
    """
    # under torchrun every rank extracts and searches its share; rank 0 probes and reports
    dist = distributed.init()
    say = (log if dist.is_main else None) or (lambda _: None)
    extract = ExtractOptions(
        layers=layers, pool=pool, tokens=tokens, batch_size=batch_size, device=device,
        precision=precision, cache_dir=cache_dir, quiet=quiet,
    )  # fmt: skip
    plan = TriagePlan.resolve(
        backbones, data, transfer=transfer, methods=methods, ks=ks, features=features,
        reference=reference, pixel_cache=pixel_cache, pixel_size=pixel_size, img_size=img_size,
        shots=shots, episodes=episodes, extract=extract, probe_options=probe_options,
    )  # fmt: skip
    # evaluations an interrupted run into the same `out` finished are kept, not redone
    journal = None if dist.is_group else Journal(Path(out).expanduser() / ".progress.jsonl")
    plan.announce(say)
    records: list[Record] = []
    groups = [(spec, pairs) for size in plan.sizes for spec, pairs in _run_size(
        plan, size, journal, records, say).items()]  # fmt: skip
    reference = plan.reference
    if reference is not None and plan.sweep:  # the reference model at the first size
        reference = sized(Record("note", reference, ""), plan.sizes[0]).model
    if dist.is_main:  # the leaderboard's cells, computed once: similarity and the report
        cells = leaderboard_cells(records)
        records += _compare_all(groups, cells, plan.methods, concat, say)
        rep, files = write_report(records, out, reference=reference, plots=plots, cells=cells)
    if dist.is_group:  # every rank returns rank 0's report
        records, files = dist.broadcast((records, files) if dist.is_main else None)
        rep = build_report(records, reference)
    return TriageResult(rep, files, str(Path(out).expanduser()))


def _run_size(
    plan: TriagePlan,
    size: int | None,
    journal: Journal | None,
    records: list[Record],
    say: Callable[[str], None],
) -> dict[str, list[tuple[str, FeatureStore]]]:
    """Every backbone at one size: extracted, then evaluated on every dataset; the stores of
    each dataset by the label its backbone goes by."""
    options = plan.at(size)
    by_data: dict[str, list[tuple[str, FeatureStore]]] = {}
    for b in plan.models:
        first = len(records)
        stores = _extract_all(b, plan, options, records, say)
        label = sized(Record("note", b.label, ""), size).model if plan.sweep else b.label
        for spec in plan.data_specs:
            if spec in stores:
                _evaluate_one(b, spec, stores, plan, journal, records, say)
                by_data.setdefault(spec, []).append((label, stores[spec]))
        if plan.sweep:  # every entry of a sweep is a model at one size
            records[first:] = [sized(r, size) for r in records[first:]]
    return by_data


def _compare_all(
    groups: list[tuple[str, list[tuple[str, FeatureStore]]]],
    cells: list[Cell],
    methods: list[str],
    concat: bool,
    say: Callable[[str], None],
) -> list[Record]:
    """How alike the backbones' representations are, per dataset (and size): a failure is a
    row of the report."""
    out: list[Record] = []
    for spec, pairs in groups:
        try:
            out += similarity_records(pairs, cells, methods, concat)
        except Exception as e:
            msg = failure_message(e)
            out.append(note("error", "-", spec, stage="compare", message=msg))
            say(f"  comparing the backbones on {spec}: FAILED: {msg}")
    return out


def sized(record: Record, size: int | None) -> Record:
    """`record` of a resolution sweep: its model named with the size (`dino_vits16 @224px`)."""
    return replace(record, model=f"{record.model} @{'native' if size is None else f'{size}px'}")


def _extract_all(
    b: ModelSpec,
    plan: TriagePlan,
    options: ExtractOptions,
    records: list[Record],
    say: Callable[[str], None],
) -> dict[str, FeatureStore]:
    """One backbone's store of every dataset; a failure is a row of the report, not the end."""
    stores: dict[str, FeatureStore] = {}
    for spec, ds in plan.datasets.items():
        try:
            stores[spec] = extraction_record(b, ds, plan.for_dataset(options, ds), records, say)
        except Exception as e:  # one backbone's failure is a row, not the end of the run
            records.append(
                note("error", b.label, ds.spec, stage="extract", message=failure_message(e))
            )
            say(f"  {b.label} on {ds.spec}: FAILED to extract: {failure_message(e)}")
    return stores


def _fewshot_key(store: FeatureStore, plan: TriagePlan) -> Any:
    """Shots, episodes and the hash of the images they sample (None without few-shot)."""
    if not plan.shots or "train" not in store.splits:
        return None
    from probekit.fewshot import support_digest

    try:
        digest = support_digest(store, plan.shots, plan.episodes)
    except Exception:  # a split few-shot cannot sample from: the evaluation says why
        digest = None
    return [list(plan.shots), plan.episodes, digest]


def _evaluate_one(
    b: ModelSpec,
    spec: str,
    stores: dict[str, FeatureStore],
    plan: TriagePlan,
    journal: Journal | None,
    records: list[Record],
    say: Callable[[str], None],
) -> None:
    """kNN and probes of one backbone on one dataset (and its transfers), or what an earlier
    run of the same evaluation kept."""
    targets = [stores[dst] for src, dst in plan.pairs if src == spec and dst in stores]
    key = journal_key(
        b.label,
        stores[spec],
        targets,
        plan.methods,
        plan.ks,
        plan.features,
        _fewshot_key(stores[spec], plan),
        plan.probe_options or None,
    )
    kept = journal.get(key) if journal is not None else None
    if kept is not None:
        records += [Record.from_dict(r) for r in kept["records"]]
        say(f"  {b.label} on {spec}: {kept['lines']} (kept from an earlier run)")
        return
    t0 = time.perf_counter()
    first = len(records)
    try:
        lines = _evaluate(
            b,
            stores[spec],
            targets,
            plan.methods,
            plan.ks,
            plan.features,
            records,
            (plan.shots, plan.episodes),
            plan.probe_options,
        )
    except Exception as e:
        records.append(note("error", b.label, spec, stage="evaluate", message=failure_message(e)))
        say(f"  {b.label} on {spec}: FAILED to evaluate: {failure_message(e)}")
        return
    secs = time.perf_counter() - t0
    records.append(note("time", b.label, spec, stage="evaluate", seconds=secs))
    say(f"  {b.label} on {spec}: {lines} ({secs:.1f} s)")
    done = records[first:]
    if journal is not None and not any(r.kind == "error" for r in done):
        journal.add(key, {"records": [r.to_dict() for r in done], "lines": lines})
