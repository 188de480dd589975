"""The extraction loop: batches in (decoded, from memory or from the pixel cache), one forward
each, features to the chunk writer; nothing here decides anything the plan has not."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from probekit.cache.reader import PixelReader
from probekit.cache.store import FeatureStore, Location
from probekit.cache.writer import ChunkBuffer, ChunkWriter
from probekit.errors import InvalidImageError
from probekit.extraction.model import FeatureExtractor
from probekit.extraction.sources import (
    EncodedSource,
    ImageSource,
    decode_on_device,
    decode_worker_init,
    pass_batch,
)

if TYPE_CHECKING:
    from probekit.cache.pixels import PixelSource
    from probekit.extraction.plan import ExtractPlan

__all__ = ["DeviceQueue", "LoopStats", "Runner", "Waits", "batches_of"]


@dataclass
class Waits:
    """Seconds the extraction loop's host thread waited: for input batches (decoding or
    reading), for the device (its queue full: the device is the bottleneck, as it should be
    on a GPU) and for storage (chunk writes)."""

    input: float = 0.0
    device: float = 0.0
    storage: float = 0.0

    @contextlib.contextmanager
    def on(self, what: Literal["input", "device", "storage"]) -> Iterator[None]:
        """Add the time spent in the block to the waits for `what`."""
        t = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, what, getattr(self, what) + time.perf_counter() - t)

    def rounded(self) -> dict[str, float]:
        return {k: round(getattr(self, k), 3) for k in ("input", "device", "storage")}


@dataclass
class LoopStats:
    """What one pass of the loop did."""

    images: int = 0
    compile_s: float = 0.0  # the first (compiling) batch, when compiling
    loop_s: float = 0.0  # from the first batch asked for to the last chunk written
    waits: Waits = field(default_factory=Waits)


def batches_of(
    chunks: Sequence[int], n: int, chunk_rows: int, batch_size: int
) -> Iterator[list[int]]:
    """Row batches of `chunks` (of a split of `n` rows): never straddling two chunks."""
    for c in chunks:
        start, stop = c * chunk_rows, min(n, (c + 1) * chunk_rows)
        for b in range(start, stop, batch_size):
            yield list(range(b, min(stop, b + batch_size)))


Ready = Callable[[list[int], np.ndarray, torch.Tensor, list[str]], None]


class DeviceQueue:
    """Features handed on as they come back from the device.

    On CUDA a batch's features are read back `depth` batches late: the host finishes batch i
    (and copies the next batches in on a side stream) while the GPU computes batches i + 1 ...,
    so a hiccup of the host never idles the device. On a CPU each batch is handed on at once.
    """

    def __init__(self, depth: int, cuda: bool, ready: Ready, waits: Waits):
        self.depth, self.ready, self.waits = depth, ready, waits
        self.copy_stream = torch.cuda.Stream() if cuda else None  # type: ignore[no-untyped-call]
        # (rows, features on the host (one array), their copy's event, valid, reasons, the
        # batch: kept referenced so its pinned memory is not reused while read)
        self.lagged: list[tuple[list[int], torch.Tensor, Any, Any, Any, Any]] = []

    def to_device(self, images: torch.Tensor, device: str) -> torch.Tensor:
        """A host batch copied in on the side stream (CUDA), or the batch as it is."""
        if self.copy_stream is None or images.device.type != "cpu":
            return images
        with torch.cuda.stream(self.copy_stream):
            x = images.to(device, non_blocking=True)
        torch.cuda.current_stream().wait_stream(self.copy_stream)
        x.record_stream(torch.cuda.current_stream())
        return x

    def put(
        self,
        rows: list[int],
        flat: torch.Tensor,
        valid: torch.Tensor,
        reasons: list[str],
        keep: Any,
    ) -> None:
        """One batch's features (B, sum of dims) on the device; `keep` stays referenced until
        they are read back."""
        if self.copy_stream is None:
            self.ready(rows, flat.numpy(), valid, reasons)
            return
        host = flat.to("cpu", non_blocking=True)
        done = torch.cuda.Event()  # type: ignore[no-untyped-call]
        done.record()
        self.lagged.append((rows, host, done, valid, reasons, keep))
        while len(self.lagged) > self.depth:
            self._settle(*self.lagged.pop(0))

    def flush(self) -> None:
        """Hand on every batch still queued."""
        while self.lagged:
            self._settle(*self.lagged.pop(0))

    def _settle(
        self, rows: list[int], host: torch.Tensor, done: Any, valid: Any, why: Any, _: Any
    ) -> None:
        with self.waits.on("device"):
            done.synchronize()
        self.ready(rows, host.numpy(), valid, why)


class Sink:
    """The host side of one split: validity, chunk buffers filled batch by batch, and handed to
    the writer process when full."""

    def __init__(
        self,
        writer: ChunkWriter,
        split: str,
        ids: Sequence[str],
        labels: np.ndarray,
        chunk_rows: int,
        strict: bool,
        waits: Waits,
        bad_rows: dict[int, str] | None = None,
    ):
        self.writer, self.split, self.chunk_rows = writer, split, chunk_rows
        # why a row cannot be used before its image is read (its mask, its boxes), by row
        self.bad_rows = bad_rows or {}
        self.ids, self.labels = ids, labels
        self.n = len(self.ids)
        self.strict, self.waits = strict, waits
        self.buf: ChunkBuffer | None = None
        self.reasons: dict[int, str] = {}  # why rows of the chunk being filled are invalid

    def consume(
        self,
        rows: list[int],
        feats: np.ndarray,
        valid_t: torch.Tensor,
        reasons_t: list[str],
    ) -> None:
        """One batch: rows `rows`, features (B, sum of dims) float32 in the store's order."""
        valid = valid_t.numpy()
        if self.bad_rows:  # a row whose mask or boxes cannot be used is invalid, for its reason
            bad = [(k, self.bad_rows[r]) for k, r in enumerate(rows) if r in self.bad_rows]
            if bad:
                valid, reasons_t = valid.copy(), list(reasons_t)
                for k, why in bad:
                    valid[k], reasons_t[k] = False, reasons_t[k] or why
        if self.strict and not valid.all():
            first = int(np.flatnonzero(~valid)[0])
            raise InvalidImageError(
                f"cannot read image {self.ids[rows[first]]!r}: {reasons_t[first]} "
                "(strict mode; drop --strict to mark such images invalid and go on)."
            )
        chunk = rows[0] // self.chunk_rows
        start, stop = chunk * self.chunk_rows, min(self.n, (chunk + 1) * self.chunk_rows)
        if self.buf is None:
            with self.waits.on("storage"):  # at most SLOTS - 1 chunks wait for storage
                self.buf = self.writer.acquire()
            self.reasons = {}
        at = rows[0] - start
        self.buf.features[at : at + len(rows)] = feats
        self.buf.valid[at : at + len(rows)] = valid
        self.reasons.update((at + i, why) for i, why in enumerate(reasons_t) if why)
        if rows[-1] + 1 < stop:
            return  # batches never straddle chunks: this chunk is not full yet
        self.writer.submit(
            self.buf,
            self.split,
            chunk,
            stop - start,
            self.labels[start:stop],
            self.ids[start:stop],
            self.reasons,
        )
        self.buf = None


def threaded(source: Any, batches: list[list[int]], threads: int, pin: bool) -> Iterator[Any]:
    """`source`'s batches in order, read by `threads` threads up to 2 x threads ahead; each
    batch copied once into pinned memory when `pin` (for asynchronous copies to the GPU)."""

    def load(rows: list[int]) -> Any:
        if pin and hasattr(source, "read_into"):  # straight from the file into pinned memory
            buf = torch.empty((len(rows), *source.shape), dtype=torch.uint8, pin_memory=True)
            _, valid, reasons = source.read_into(rows, buf.numpy())
            # the pinned tensor itself (NHWC as NCHW, channels-last), not a view made through
            # NumPy: asynchronous copies record their use of it with the pinned-memory cache
            return buf.permute(0, 3, 1, 2), valid, reasons
        images, valid, reasons = source.__getitems__(rows)
        if pin:
            pinned = torch.empty_like(images, pin_memory=True)  # keeps channels-last strides
            images = pinned.copy_(images)
        return images, valid, reasons

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="probekit-reader") as pool:
        ahead: list[Future[Any]] = []
        todo = iter(batches)
        for rows in todo:
            ahead.append(pool.submit(load, rows))
            if len(ahead) >= 2 * threads:
                break
        while ahead:
            batch = ahead.pop(0).result()
            nxt = next(todo, None)
            if nxt is not None:
                ahead.append(pool.submit(load, nxt))
            yield batch


@contextlib.contextmanager
def progress_bar(title: str, total: int, quiet: bool) -> Iterator[Callable[[int, float], None]]:
    """A live bar on stderr where someone watches; yields `advance(images, images_per_s)`."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        console=console,
        disable=quiet or not console.is_terminal,
        transient=True,
    )
    with progress:
        task = progress.add_task(title, total=total, rate="")

        def advance(n: int, rate: float) -> None:
            progress.update(task, advance=n, rate=f"{rate:.1f} img/s")

        yield advance


class Runner:
    """One pass over every pending chunk of a store (this rank's share of them)."""

    def __init__(
        self,
        plan: ExtractPlan,
        fx: FeatureExtractor,
        writer: ChunkWriter,
        reader: PixelReader | None,
        pixel_path: Location | None,
        shard: tuple[int, int] = (0, 1),
        bad_rows: Mapping[str, Mapping[int, str]] | None = None,
    ):
        self.plan, self.fx, self.writer, self.reader = plan, fx, writer, reader
        self.pixel_path, self.shard = pixel_path, shard
        self.workers = plan.loop_workers()
        # rows known invalid before any image is read (a detection row's unusable boxes)
        self.bad_rows = bad_rows or {}

    def pending(self, store: FeatureStore) -> dict[str, list[int]]:
        """This process's chunks: every world-th pending (split, chunk), so no chunk has two
        writers."""
        splits = self.plan.dataset.splits
        rank, world = self.shard
        everything = [(s, c) for s in splits for c in store.pending_chunks(s)]
        pending: dict[str, list[int]] = {s: [] for s in splits}
        for s, c in everything[rank::world]:
            pending[s].append(c)
        return pending

    def run(self, store: FeatureStore) -> LoopStats:
        """Extract every pending chunk of this process's share; return what the pass did."""
        chunk_rows = int(store.meta["chunk_rows"])
        pending = self.pending(store)
        splits = self.plan.dataset.splits
        todo = sum(
            min(len(splits[s]), (c + 1) * chunk_rows) - c * chunk_rows
            for s, cs in pending.items()
            for c in cs
        )
        names = list(self.fx.names)  # a batch's features side by side, in this order
        shapes = {k: tuple(v) for k, v in store.meta.get("token_shapes", {}).items()}
        widths = {k: int(t) * int(d) for k, (t, d) in shapes.items()}  # tokens travel flat
        dims = {k: widths.get(k) or int(store.meta["feature_dims"][k]) for k in names}
        f32 = set(store.meta.get("float32_features", []))
        self.writer.begin(store.path, dims, self.plan.options.dtype, f32, chunk_rows, shapes)
        stats = LoopStats()
        t_start = time.perf_counter()
        try:
            title = f"extract {self.fx.model.__class__.__name__}"
            with progress_bar(title, todo, self.plan.options.quiet) as advance:
                for split, chunks in pending.items():
                    if chunks and len(splits[split]):
                        self._split(
                            store, split, chunks, chunk_rows, names, stats, t_start, advance
                        )
            with stats.waits.on("storage"):
                self.writer.wait()
        finally:
            self.writer.settle()  # no chunk of this pass is written after it returns
        stats.loop_s = time.perf_counter() - t_start
        return stats

    def _split(
        self,
        store: FeatureStore,
        split: str,
        chunks: list[int],
        chunk_rows: int,
        names: list[str],
        stats: LoopStats,
        t_start: float,
        advance: Callable[[int, float], None],
    ) -> None:
        opts, fx = self.plan.options, self.fx
        s = self.plan.dataset.splits[split]
        batches = list(batches_of(chunks, len(s), chunk_rows, opts.batch_size))
        bad = dict(self.bad_rows.get(split, {}))
        if store.mask_shape is not None:  # each chunk's masks are written ahead of its features
            from probekit.extraction.masks import write_masks

            with stats.waits.on("input"):
                bad_masks = write_masks(
                    store,
                    self.plan.dataset,
                    split,
                    chunks,
                    self.plan.geometry.mask,
                    max(2, self.workers),
                )
            bad.update(bad_masks)
        sink = Sink(self.writer, split, s.ids, s.labels, chunk_rows, opts.strict, stats.waits, bad)

        def ready(rows: list[int], feats: np.ndarray, valid: torch.Tensor, why: list[str]) -> None:
            sink.consume(rows, feats, valid, why)
            stats.images += len(rows)
            advance(len(rows), stats.images / max(time.perf_counter() - t_start, 1e-9))

        queue = DeviceQueue(opts.device_queue, fx.policy.is_cuda, ready, stats.waits)
        fixed = self.plan.compile  # one batch shape: no recompilation
        gpu_decode = opts.decode == "gpu" and self.pixel_path is None
        batches_in = iter(self._loader(split, batches))
        for rows in batches:
            with stats.waits.on("input"):
                images, valid, reasons = next(batches_in)
            b = len(rows)
            if gpu_decode:
                images, valid, reasons = decode_on_device(
                    images, valid, reasons, self.plan.geometry, self.plan.size, fx.policy.device
                )
            if fixed and b < opts.batch_size:
                pad = images.new_zeros(opts.batch_size - b, *images.shape[1:])
                images = torch.cat([images, pad])
            x = queue.to_device(images, fx.policy.device)
            # one layout for every batch, whatever its source (a padded batch, decoded on the
            # device): a compiled graph is specialized to its input's strides
            x = x.contiguous(memory_format=torch.channels_last)
            t_batch = time.perf_counter()
            first = stats.images == 0 and not queue.lagged and stats.compile_s == 0.0
            out = fx(x)
            if fixed and first:
                stats.compile_s = time.perf_counter() - t_batch  # the first call compiles
            # every feature in one (B, sum of dims) array: one copy back per batch
            flat = torch.cat([out[k][:b] for k in names], dim=1)
            queue.put(rows, flat, valid, reasons, (x, images))
        # the loader must be spent: its end shuts worker processes down (and a loader with
        # more batches than asked for is a bug, as zip(strict=True) would say)
        if next(batches_in, None) is not None:
            raise AssertionError("the loader yielded more batches than were asked for")
        queue.flush()

    def _loader(self, split: str, batches: list[list[int]]) -> Iterable[Any]:
        """The split's batches of uint8 images, by the fastest way to get them."""
        plan, cuda = self.plan, self.fx.policy.is_cuda
        source: torch.utils.data.Dataset[Any]
        pixels: PixelSource | None = None
        if self.pixel_path is not None:
            from probekit.cache.pixels import PixelSource

            source = pixels = PixelSource(self.pixel_path, split)
        elif plan.options.decode == "gpu":
            source = EncodedSource(plan.dataset, split)
        else:
            geometry = plan.geometry
            source = ImageSource(
                plan.dataset, split, geometry, plan.size, identity=geometry.identity_ok
            )
        if self.reader is not None and pixels is not None and pixels.raw:
            # a batch's buffer is read into again once the device has copied it: when the
            # batch `device_queue` + 1 later is asked for (the next one on a CPU)
            hold = plan.options.device_queue + 1 if cuda else 1
            return self.reader.read(
                pixels, batches, threads=max(2, self.workers), hold=hold, pin=cuda
            )
        if pixels is not None or getattr(source, "in_memory", False):
            # reads that release the GIL (chunk files, array slices): threads here, one copy
            # into pinned memory, no worker processes to copy through
            return threaded(source, batches, max(2, self.workers), cuda)
        # decoding is CPU work under the GIL: worker processes
        return torch.utils.data.DataLoader(
            source,
            batch_sampler=batches,
            collate_fn=pass_batch,
            num_workers=self.workers,
            pin_memory=cuda,
            persistent_workers=False,
            worker_init_fn=decode_worker_init,
        )
