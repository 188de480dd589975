"""Building the pixel cache: each image decoded and resized once (by worker processes) into a
uint8 pixel store that every backbone of the same geometry reads (see `probekit.cache.pixels`
for the store itself)."""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from probekit.cache.pixels import PIXEL_CHUNK_ROWS, PixelStore, pixel_store_path
from probekit.cache.store import StoreLock
from probekit.datasets import Dataset
from probekit.extraction.sources import ImageSource, decode_worker_init, pass_batch

__all__ = ["build_pixel_store"]


def build_pixel_store(
    dataset: Dataset,
    geometry: Callable[[Any], Any],
    geometry_desc: str,
    size: tuple[int, int],
    *,
    cache_dir: Any = None,
    num_workers: int = 0,
    identity: bool = False,
    chunk_rows: int = PIXEL_CHUNK_ROWS,
) -> tuple[PixelStore, bool, float]:
    """Decode every image once into the pixel store for this geometry (resumable by chunk).

    Returns (store, built now?, seconds spent decoding). A complete store is returned as is.
    """
    path = pixel_store_path(dataset.name, dataset.fingerprint, geometry_desc, size, cache_dir)
    with StoreLock(path):
        store = PixelStore.open(path)
        if store is not None and store.is_complete:
            damaged = store.damaged_chunks()  # each done chunk's file, at its exact size
            if not damaged:
                return store, False, 0.0
            store.mark_for_redo(damaged)  # decoded again below, never read as zeros
        if store is None:
            about = {"spec": dataset.spec, "fingerprint": dataset.fingerprint}
            splits = {k: len(v) for k, v in dataset.splits.items()}
            store = PixelStore.create(path, about, splits, geometry_desc, size, chunk_rows)
        rows_per_chunk = int(store.meta["chunk_rows"])
        t0 = time.perf_counter()
        for split, s in dataset.splits.items():
            n = len(s)
            rows = max(1, min(rows_per_chunk, n))
            chunks = store.pending_chunks(split)
            if n == 0 or not chunks:
                continue
            batches = [list(range(c * rows, min(n, (c + 1) * rows))) for c in chunks]
            loader = torch.utils.data.DataLoader(
                ImageSource(dataset, split, geometry, size, identity=identity),
                batch_sampler=batches,
                collate_fn=pass_batch,
                num_workers=num_workers,
                worker_init_fn=decode_worker_init,
            )
            names = ("pixels", "valid", "errors", "done", "crc")
            arrays = tuple(_array_or_none(store, split, k) for k in names)
            # chunks are written by threads (file writes release the GIL) while the next ones
            # decode; each chunk's done flag follows its own arrays
            with ThreadPoolExecutor(4, thread_name_prefix="probekit-pixels") as pool:
                writes: list[Future[None]] = []
                for c, idx, batch in zip(chunks, batches, loader, strict=True):
                    writes.append(pool.submit(_write_chunk, arrays, c, idx[0], idx[-1] + 1, *batch))
                    while len(writes) > 8 or (writes and writes[0].done()):
                        writes.pop(0).result()
                for f in writes:
                    f.result()
        seconds = time.perf_counter() - t0
        total = sum(len(s) for s in dataset.splits.values())
        # readers skip the per-row flags of a split with no invalid image (thousands of chunks)
        invalid = {k: int((~np.asarray(store.array(k, "valid")[:])).sum()) for k in dataset.splits}
        store.update_meta(
            status="complete",
            invalid=invalid,
            seconds=round(seconds, 3),
            images_per_s=round(total / seconds, 2) if seconds > 0 else None,
        )
        return store, True, seconds


def _array_or_none(store: PixelStore, split: str, name: str) -> Any:
    try:
        return store.array(split, name)
    except KeyError:  # a store made before it had crc32s
        return None


def _write_chunk(
    arrays: tuple[Any, ...], c: int, start: int, stop: int, images: Any, ok: Any, reasons: Any
) -> None:
    pix, valid, errors, done, crc = arrays
    rows = np.ascontiguousarray(images.permute(0, 2, 3, 1).numpy())
    pix[start:stop] = rows
    valid[start:stop] = ok.numpy()
    errors[start:stop] = np.array(reasons, dtype=str)
    if crc is not None:  # the chunk file's bytes: its rows, an edge chunk padded with zeros
        full = int(pix.chunks[0])
        digest = zlib.crc32(rows.data)
        if len(rows) < full:
            digest = zlib.crc32(bytes((full - len(rows)) * rows[0].nbytes), digest)
        crc[c] = digest
    done[c] = True  # only after the chunk's arrays are on disk
