"""Feature extraction: a backbone over a dataset into a resumable Zarr feature store.

Data flow: `ExtractPlan.resolve` (options, meta-device skeleton: layers, pools, geometry, store
config and path) -> the store's lock and cache lookup -> the model and the store -> the pixel
cache (optional) -> `Runner` (loader -> device -> forward_intermediates -> pooling -> chunk
writer, every pending chunk) -> the store marked complete.

    plan.py        ExtractOptions (every option, checked once), ExtractPlan
    preprocess.py  Geometry (timm's eval resize/crop), square, DeviceCrop
    model.py       DevicePolicy, pooling, FeatureExtractor
    loop.py        Runner, DeviceQueue, Sink, the readers
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from probekit import distributed
from probekit._malloc import keep_freed_memory
from probekit.backbones import Backbone
from probekit.cache.child import pooled
from probekit.cache.location import writable
from probekit.cache.reader import PixelReader
from probekit.cache.store import (
    FeatureStore,
    Location,
    StoreLock,
    location,
    open_for_resume,
    open_store,
)
from probekit.cache.writer import ChunkWriter, NeedsFloat32
from probekit.datasets import Dataset, load_dataset
from probekit.distributed import Dist
from probekit.errors import ProbekitWarning, StoreError
from probekit.extraction.loop import LoopStats, Runner, Waits
from probekit.extraction.model import (
    DEFAULT_POOLS,
    POOLS,
    DevicePolicy,
    FeatureExtractor,
    parse_pools,
    parse_tokens,
    pool_features,
    resolve_policy,
)
from probekit.extraction.plan import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CHUNK_ROWS,
    ExtractOptions,
    ExtractPlan,
    default_workers,
)
from probekit.extraction.preprocess import DeviceCrop, Geometry, geometry_transform, square
from probekit.extraction.tokens import TOKEN_CHUNK_BYTES, check_token_space
from probekit.specs import ModelSpec

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_CHUNK_ROWS",
    "DEFAULT_POOLS",
    "POOLS",
    "DeviceCrop",
    "DevicePolicy",
    "ExtractOptions",
    "ExtractPlan",
    "ExtractResult",
    "FeatureExtractor",
    "Geometry",
    "Interrupted",
    "Waits",
    "default_workers",
    "extract",
    "geometry_transform",
    "keep_freed_memory",
    "parse_pools",
    "pool_features",
    "resolve_policy",
    "square",
]


@dataclass(frozen=True)
class ExtractResult:
    """What one `extract` call did."""

    store_path: str
    cache_hit: bool
    images: int
    invalid: int
    seconds: float  # the whole call
    images_per_s: float  # the extraction loop's throughput (set-up and compiling batch apart)
    resumed_chunks: int
    backbone: str
    dataset: str
    # where the pixels came from: "decoded", or the pixel cache ("pixel cache hit"/"built")
    pixels: str = "decoded"
    compile_seconds: float = 0.0  # the first (compiling) batch, kept out of images_per_s
    # seconds the loop waited for input, the device and storage (see `Waits`)
    waits: dict[str, float] = field(default_factory=dict)
    # damage the store's check found, whose chunks this call recomputed
    repaired: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        if self.cache_hit:
            return (
                f"cache hit: {self.backbone} on {self.dataset}, {self.images} images "
                f"({self.invalid} invalid) -> {self.store_path}"
            )
        resumed = (
            f", resumed ({self.resumed_chunks} chunks were done)" if self.resumed_chunks else ""
        )
        if self.repaired:
            resumed += f", repaired {'; '.join(self.repaired)}"
        compiled = f", compile {self.compile_seconds:.1f} s" if self.compile_seconds else ""
        return (
            f"extracted {self.backbone} on {self.dataset}: {self.images} images, "
            f"{self.invalid} invalid, {self.seconds:.1f} s in all, loop {self.images_per_s:.1f} "
            f"images/s{compiled}{self._bound()}, pixels {self.pixels}{resumed} -> {self.store_path}"
        )

    def _bound(self) -> str:
        """What held the loop back when it was not the model: input or storage (> 25%)."""
        loop = self.images / self.images_per_s if self.images_per_s > 0 else 0.0
        worst = max(("input", "storage"), key=lambda k: self.waits.get(k, 0.0))
        share = self.waits.get(worst, 0.0) / loop if loop > 0 else 0.0
        return f", waited for {worst} {share:.0%} of the time" if share > 0.25 else ""


def extract(
    backbone: str | ModelSpec,
    data: str | Dataset,
    *,
    weights: str | os.PathLike[str] | None = None,
    random_init: bool = False,
    options: ExtractOptions | None = None,
    **changes: Any,
) -> ExtractResult:
    """Extract pooled multi-layer features of `backbone` over every split of `data` into the
    cache; reruns are cache hits, an interrupted run resumes chunk by chunk.

    `backbone`: NAME, NAME@random or NAME@WEIGHTS_FILE (or `weights=`/`random_init=`).
    `options` and keyword `changes`: the fields of `ExtractOptions` (layers, pool, img_size,
    dtype, precision, device, batch_size, num_workers, chunk_rows, compile, pixel_cache,
    pixel_size, decode, cache_dir, strict, overwrite, quiet), each checked before any work.
    """
    opts = ExtractOptions.of(options, **changes)
    t0 = time.perf_counter()
    model = (
        backbone
        if isinstance(backbone, ModelSpec)
        else ModelSpec.parse(backbone, weights=weights, random_init=random_init)
    )
    ds = data if isinstance(data, Dataset) else load_dataset(data)
    # under torchrun: every rank extracts its share of the store's chunks; rank 0 reports
    dist = distributed.init()
    if not dist.is_main:
        opts = replace(opts, quiet=True)
    plan = ExtractPlan.resolve(model, ds, opts, dist)
    if dist.is_main:
        for said in ds.warnings:  # kept in the store too: knn, probes and reports say it again
            warnings.warn(f"{ds.spec}: {said}", ProbekitWarning, stacklevel=2)
    if not plan.policy.is_cuda:
        keep_freed_memory()  # a CPU forward's activations stay mapped between batches
    try:
        return _extract(plan, dist, opts, t0)
    except KeyboardInterrupt:
        raise Interrupted(_kept(plan)) from None


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during an extraction; its message says what was kept and how to resume."""


def _kept(plan: ExtractPlan) -> str:
    """ "N of M chunks kept ...": the store's progress when the extraction was interrupted."""
    try:
        store = open_store(plan.path, allow_partial=True, check=False)
        total = sum(store.num_chunks(s) for s in store.splits)
        done = total - sum(len(store.pending_chunks(s)) for s in store.splits)
    except Exception:  # no store yet (or not readable): nothing was kept
        return "interrupted before any chunk was written; run the same command to start again."
    return f"interrupted: {done} of {total} chunks kept; run the same command to resume."


def _extract(plan: ExtractPlan, dist: Dist, opts: ExtractOptions, t0: float) -> ExtractResult:
    """`extract` once the plan is made: look up, build, run, finish."""
    ds = plan.dataset
    # one process of a job holds the lock (against other jobs); its ranks coordinate by barriers
    with contextlib.ExitStack() as stack:
        found, repaired = _look_up(plan, dist, stack)
        if dist.broadcast(found is not None and found.is_complete):
            return _cache_hit(plan, t0)
        repaired = dist.broadcast(repaired)
        # the writer (and reader) processes start now, or were kept from an earlier call:
        # they import while the model is built
        writer = stack.enter_context(pooled(ChunkWriter))
        reader = None
        if plan.pixels is not None and opts.pixel_reader == "process":
            reader = stack.enter_context(pooled(PixelReader))
        bb = plan.build()
        fx = FeatureExtractor(
            bb,
            plan.layers,
            plan.pools,
            plan.policy,
            compile=plan.compile,
            crop=None if plan.pixels is None else plan.pixels.crop,
            tokens=parse_tokens(plan.options.tokens),
        )
        tables = _box_tables(plan)
        store = _prepare_store(plan, bb, fx, found, dist, tables)
        resumed = sum(store.num_chunks(s) - len(store.pending_chunks(s)) for s in ds.splits)
        pixel_path, pixels = _pixel_input(plan, store, dist)
        bad = {s: t.reasons for s, t in (tables or {}).items()}
        runner = Runner(plan, fx, writer, reader, pixel_path, dist.shard, bad)
        store, stats = _run(plan, store, runner, dist)
        result = _finish(plan, store, stats, resumed, pixels, dist, t0)
        return replace(result, repaired=tuple(repaired))


def _look_up(
    plan: ExtractPlan, dist: Dist, stack: contextlib.ExitStack
) -> tuple[FeatureStore | None, list[str]]:
    """Take the store's lock (rank 0) and find the store to reuse or resume, if any: checked,
    and where damaged, its damaged chunks marked for redoing (what was found is returned)."""
    if not dist.is_main:
        return None, []
    if not writable(plan.path.parent):  # a read-only cache: a complete sound store is read
        return _read_only(plan), []
    stack.enter_context(StoreLock(plan.path))
    if plan.options.overwrite:
        return None, []
    found = open_for_resume(plan.path, plan.dataset.fingerprint, plan.dataset.spec)
    if found is None:
        return None, []
    return found, found.mark_for_redo(found.check())


def _read_only(plan: ExtractPlan) -> FeatureStore:
    """The complete, sound store of a read-only cache (no lock is taken: nothing is written),
    or a one-line error saying why nothing can be extracted there."""
    where = f"the cache {plan.path.parent} is read-only"
    found = (
        None
        if plan.options.overwrite
        else open_for_resume(plan.path, plan.dataset.fingerprint, plan.dataset.spec)
    )
    if found is None or not found.is_complete:
        state = "has no store" if found is None else "holds only a partial store"
        raise StoreError(
            f"{where} and {state} of {plan.model.label} on {plan.dataset.spec}: extract with "
            "--cache-dir on a writable disk (complete stores of a read-only cache are read)."
        )
    report = found.check()
    if not report.ok:
        raise StoreError(f"{where}, so this damage cannot be repaired here: {report.message()}")
    return found


def _cache_hit(plan: ExtractPlan, t0: float) -> ExtractResult:
    meta = open_store(plan.path, check=False).meta  # checked by `_look_up`
    return ExtractResult(
        str(plan.path),
        True,
        plan.images,
        int(meta.get("invalid", 0)),
        time.perf_counter() - t0,
        0.0,
        0,
        plan.model.label,
        plan.dataset.spec,
        # how the store was made (its pixels, its compile time), not this lookup
        str(meta.get("pixels", "decoded")),
        float(meta.get("compile_seconds", 0.0)),
    )


def _box_tables(plan: ExtractPlan) -> dict[str, Any] | None:
    """A detection dataset's boxes through the model's geometry (None for other datasets)."""
    if not plan.dataset.detection:
        return None
    from probekit.extraction.boxes import box_tables

    return box_tables(plan.dataset, plan.geometry.boxes)


def _prepare_store(
    plan: ExtractPlan,
    bb: Backbone,
    fx: FeatureExtractor,
    found: FeatureStore | None,
    dist: Dist,
    tables: Mapping[str, Any] | None = None,
) -> FeatureStore:
    """A new store (rank 0 makes it), or the one found, cleared of a killed writer's temp files
    (a detection store's boxes written anew: a repair may have remade them)."""
    boxes = None
    if tables is not None:
        boxes = {s: (t.table, t.offsets, t.scales) for s, t in tables.items()}
    store = found
    if dist.is_main and store is None:
        widths = fx.dims(plan.size)
        dims = {k: v for k, v in widths.items() if k not in fx.token_shapes}
        chunk_rows = plan.options.chunk_rows
        if fx.token_shapes:
            check_token_space(plan, fx)
            # a chunk's rows travel through shared buffers as float32: a bounded chunk
            chunk_rows = min(chunk_rows, max(16, TOKEN_CHUNK_BYTES // (4 * sum(widths.values()))))
            # a multiple of 64 where it can: the token shards' inner chunks divide it
            chunk_rows = chunk_rows // 64 * 64 or chunk_rows
        meta = plan.store_meta(bb, fx)
        if tables is not None:
            meta["box_stats"] = {s: t.stats() for s, t in tables.items()}
            meta["box_layout"] = plan.dataset.box_layout
        store = FeatureStore.create(
            plan.path,
            plan.config,
            meta,
            {k: len(v) for k, v in plan.dataset.splits.items()},
            dims,
            chunk_rows,
            set(),
            fx.token_shapes,
            mask_shape=plan.size if plan.dataset.dense else None,
            boxes=boxes,
        )
    elif store is not None:
        store.remove_partial_files()
        if boxes is not None:
            store.write_boxes(boxes)
    dist.barrier()  # the store exists, as rank 0 made or found it
    return store if store is not None else open_store(plan.path, allow_partial=True, check=False)


def _pixel_input(plan: ExtractPlan, store: FeatureStore, dist: Dist) -> tuple[Location | None, str]:
    """The pixel store the loop reads (built by rank 0 where needed), and how to say so."""
    said = {"gpu": "decoded on the GPU", "draft": "decoded (JPEG drafts)"}.get(
        plan.options.decode, "decoded"
    )
    px = plan.pixels
    if px is None or not any(store.pending_chunks(s) for s in plan.dataset.splits):
        return None, said
    built_info: tuple[str, bool, Any] | None = None
    if dist.is_main:  # one process decodes; the ranks then read the same pixel store
        from probekit.extraction.pixels import build_pixel_store

        pstore, built, _secs = build_pixel_store(
            plan.dataset,
            px.geometry,
            px.geometry.describe(),
            px.size,
            cache_dir=plan.options.cache_dir,
            num_workers=plan.decode_workers(),
            identity=px.geometry.identity_ok,
        )
        built_info = (str(pstore.path), built, pstore.meta.get("images_per_s"))
    path, built, rate = dist.broadcast(built_info)
    said = "from the pixel cache"
    if px.crop is not None:
        resized = " and resized" if px.crop.cut != px.crop.size else ""
        said += f" of {px.side} px squares, cut{resized} on the device"
    if built:
        said += f" (built now, decode {rate:.0f} images/s)"
    return location(path), said


def _run(
    plan: ExtractPlan, store: FeatureStore, runner: Runner, dist: Dist
) -> tuple[FeatureStore, LoopStats]:
    """Passes of the loop until one completes: a feature that overflows float16 is kept in
    float32 from then on and the chunks written so far are redone."""
    while True:
        need: str | None = None
        try:
            stats = runner.run(store)
        except NeedsFloat32 as e:
            need = e.name
        needs = sorted({n for n in dist.all_gather(need) if n})
        if not needs:
            return store, stats
        for name in needs:
            warnings.warn(
                f"{name} overflows float16; storing it in float32 and redoing "
                "the chunks written so far",
                ProbekitWarning,
                stacklevel=4,
            )
            if dist.is_main:  # every rank has stopped writing (the gather above)
                store.switch_to_float32(name)
        if dist.is_group:
            dist.barrier()
            store = open_store(plan.path, allow_partial=True, check=False)


def _finish(
    plan: ExtractPlan,
    store: FeatureStore,
    stats: LoopStats,
    resumed: int,
    pixels: str,
    dist: Dist,
    t0: float,
) -> ExtractResult:
    """Mark the store complete (rank 0) with how it was made; the call's result."""
    # throughput of the extraction loop (loading, forward, pooling, writing); model and store
    # set-up and the compiling first batch are outside it, `seconds` has them all
    images, run_s, compile_s = stats.images, stats.loop_s - stats.compile_s, stats.compile_s
    waited = stats.waits.rounded()
    if dist.is_group:  # all ranks' images over the slowest rank's loop
        parts = dist.all_gather((images, run_s, compile_s, waited))
        images = sum(p[0] for p in parts)
        run_s, compile_s = max(p[1] for p in parts), max(p[2] for p in parts)
        waited = {k: max(p[3][k] for p in parts) for k in waited}
    rate = images / run_s if run_s > 0 else 0.0
    seconds = time.perf_counter() - t0
    invalid = 0
    if dist.is_main:  # every chunk of every rank is written (the gather above)
        invalid = sum(int((~store.valid(s)).sum()) for s in plan.dataset.splits)
        store.update_meta(
            status="complete",
            invalid=invalid,
            seconds=round(seconds, 3),
            compile_seconds=round(compile_s, 3),
            images_per_s=round(rate, 2),
            waits_seconds=waited,
            pixels=pixels,
            processes=dist.world,
        )
    invalid = dist.broadcast(invalid)  # after rank 0 marked the store complete
    return ExtractResult(
        str(plan.path),
        False,
        plan.images,
        invalid,
        seconds,
        rate,
        resumed,
        plan.model.label,
        plan.dataset.spec,
        pixels,
        compile_s,
        waited,
    )
