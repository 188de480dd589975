"""`probekit verify`: a store's full check (every chunk decoded), and its repair: the damaged
chunks marked for redoing and recomputed by the extraction the store records (its recipe)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from probekit.cache.check import CheckReport, summarize
from probekit.cache.location import location
from probekit.cache.pixels import PixelStore
from probekit.cache.store import StoreLock, open_store
from probekit.errors import ProbekitError, StoreError

__all__ = ["VerifyResult", "verify"]


@dataclass(frozen=True)
class VerifyResult:
    """What `verify` found, and what a repair did."""

    store: str
    report: Mapping[str, Any]  # `check.summarize` of the full check
    repaired: tuple[str, ...] = ()  # the damage whose chunks were recomputed
    ok: bool = True  # sound now (as found, or after the repair)
    note: str = ""  # what a repair did where it did not recompute (a pixel store)

    @property
    def complete(self) -> bool:
        return not int(self.report.get("pending") or 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        chunks = self.report["chunks_read"]
        if self.note:
            return self.note
        if self.repaired:
            return f"repaired {'; '.join(self.repaired)} -> {self.store} (every chunk now decodes)"
        pending = int(self.report.get("pending") or 0)
        if self.ok and pending:
            return (
                f"incomplete: {self.store}: {pending} of {self.report['chunks']} chunks pending "
                f"(the {chunks} done ones decode); rerun the extraction to finish it"
            )
        if self.ok:
            return f"ok: {self.store} ({chunks} chunks read, every one decodes)"
        return "damaged: " + "; ".join(
            f"{d['split']}/{d['array']}"
            + (f" chunks {d['chunks']}" if len(d["chunks"]) else "")
            + f" ({d['reason']})"
            for d in self.report["damage"]
        )


def verify(
    store: str | os.PathLike[str], *, repair: bool = False, quiet: bool = True
) -> VerifyResult:
    """Read every chunk of every array of `store` (the full check). `repair`: mark each
    damaged chunk for redoing, then recompute exactly those with the extraction the store
    records, and check again. A store that cannot be recomputed here (no recipe, its dataset
    or weights gone, made on another kind of device) is a one-line error saying what to run."""
    path = location(store)
    pixels = PixelStore.open(path) if (path / "zarr.json").is_file() else None
    if pixels is not None:
        return _verify_pixels(pixels, str(path), repair)
    fs = open_store(path, allow_partial=True, check=False)
    report = fs.check(full=True)
    if report.ok or not repair:
        return VerifyResult(str(path), summarize(report), (), report.ok)
    with StoreLock(path):
        found = fs.mark_for_redo(report)
    _recompute(fs.info.raw, path, report, quiet)
    after = open_store(path, check=False).check(full=True)
    if not after.ok:
        raise StoreError(f"the repair of {path} left damage: {after.message()}")
    return VerifyResult(str(path), summarize(report), tuple(found), True)


def _verify_pixels(ps: PixelStore, where: str, repair: bool) -> VerifyResult:
    """A pixel store's full check: every done chunk's file there, at its size, with the crc32
    recorded when it was written; `repair`: the damaged chunks marked for decoding again (by
    the next extract or triage that reads this pixel cache: the store records no decoder)."""
    bad = ps.damaged_chunks(full=True)
    splits = list(ps.meta["splits"])
    total = sum(ps.num_chunks(s) for s in splits)
    report = {
        "store": where,
        "full": True,
        "chunks_read": total,
        "chunks": total,
        "pending": sum(len(ps.pending_chunks(s)) for s in splits),
        "damage": [
            {
                "split": s,
                "array": "pixels",
                "chunks": list(cs),
                "reason": "file missing, short, or not the bytes written (crc32)",
            }
            for s, cs in bad.items()
        ],
    }
    if not bad or not repair:
        return VerifyResult(where, report, (), not bad)
    ps.mark_for_redo(bad)
    found = tuple(f"{len(cs)} chunks of {s}/pixels" for s, cs in bad.items())
    note = (
        f"marked {'; '.join(found)} of pixel store {where} for decoding again: the next "
        "extract or triage that reads it decodes them"
    )
    return VerifyResult(where, report, found, True, note)


def _recompute(meta: Mapping[str, Any], path: Any, report: CheckReport, quiet: bool) -> None:
    from probekit.backbones.sources import source_of
    from probekit.datasets import load_dataset
    from probekit.extraction import extract
    from probekit.extraction.plan import ExtractOptions, ExtractPlan
    from probekit.specs import ModelSpec

    recipe = meta.get("recipe")
    redo = f"its {report.count()} damaged chunks are marked for redoing"
    if not isinstance(recipe, Mapping):
        raise StoreError(
            f"{path} records no recipe (made by an older probekit): {redo}; rerun the "
            "`probekit extract` command that made it."
        )
    backbone, spec = str(recipe["backbone"]), str(recipe["dataset"])
    cache_dir = path.parent.parent  # <root>/<dataset>/<store>
    try:
        model = ModelSpec.parse(backbone)
    except ProbekitError as e:
        raise StoreError(f"{path} records a backbone probekit cannot read ({e}); {redo}.") from None
    if source_of(model.name).kind == "python":  # a store never runs the code it names
        raise StoreError(
            f"{path} was made by the Python function {model.name}: a store never runs the "
            f"code it names. {redo}: rerun `probekit extract --backbone {backbone} --data "
            f"{spec}` with the options that made it, if you trust that code."
        )
    try:
        ds = load_dataset(spec)
        opts = ExtractOptions.of(cache_dir=cache_dir, quiet=quiet, **recipe["options"])
        plan = ExtractPlan.resolve(model, ds, opts)
    except ProbekitError as e:
        raise StoreError(
            f"{path} cannot be recomputed here ({e}); {redo}: rerun `probekit extract "
            f"--backbone {backbone} --data {spec}` with the options that made it."
        ) from None
    if str(plan.path) != str(path):
        raise StoreError(
            f"extracting {backbone} on {spec} here would make another store ({plan.path.name}: "
            f"another device, precision or version); {redo} in {path}: rerun the `probekit "
            "extract` command that made it where it was made."
        )
    extract(model, ds, options=opts)
