"""The pixel cache: each image decoded and resized once, kept as uint8 in a Zarr v3 store.

A triage runs many backbones over the same images; most share a geometry (resize, crop,
interpolation), so decoding JPEGs again for every backbone wastes most of the time on small
models. A pixel store holds the images exactly as a model with that geometry receives them
before normalization; any backbone with the same geometry reads them from here, and
normalization runs batched on the device. A store of squares (each short side resized, its
centre square kept: `extract(pixel_size=...)`) serves every centre-crop geometry: each
backbone's crop is cut and resized from it on the device, batched.

Layout (`<cache>/<dataset>/pixels/<key>.zarr`, key = hash of dataset fingerprint + geometry):

    zarr.json          attributes["probekit_pixels"]: dataset, geometry, size, status, timings
    <split>/pixels     (N, H, W, 3) uint8, chunked along N, uncompressed: each chunk file holds
                       its rows' bytes, so readers copy straight from the file into (pinned)
                       memory with the GIL released, no decoding step
    <split>/valid      (N,) bool     <split>/errors (N,) string
    <split>/done       (n_chunks,) bool: a chunk's flag is set after its arrays are written
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import zarr
import zarr.codecs

from probekit.cache.reader import read_rows
from probekit.cache.store import Location, StoreLock, cache_root, is_remote
from probekit.data import Batch, Dataset, ImageSource, pass_batch
from probekit.errors import StoreError

__all__ = [
    "PIXEL_CHUNK_ROWS",
    "PixelSource",
    "PixelStore",
    "build_pixel_store",
    "pixel_store_path",
]

PIXEL_KEY = "probekit_pixels"
PIXEL_FORMAT = 1
# 64 rows of 224 x 224 x 3 = 9.6 MB per chunk: batches of 64 (or multiples) read whole chunks
PIXEL_CHUNK_ROWS = 64
_COMPRESSOR = zarr.codecs.ZstdCodec(level=1, checksum=True)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def geometry_key(dataset: Dataset, geometry: str, size: tuple[int, int]) -> str:
    blob = json.dumps(
        {"format": PIXEL_FORMAT, "data": dataset.fingerprint, "geometry": geometry, "size": size},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def pixel_store_path(
    dataset: Dataset, geometry: str, size: tuple[int, int], cache_dir: Any = None
) -> Location:
    return (
        cache_root(cache_dir)
        / dataset.name
        / "pixels"
        / f"{geometry_key(dataset, geometry, size)}.zarr"
    )


class PixelStore:
    """A pixel store opened for reading or (by `build_pixel_store`) writing."""

    def __init__(self, path: Location, group: zarr.Group):
        self.path, self.group = path, group

    @classmethod
    def open(cls, path: Location) -> PixelStore | None:
        """The store at `path`, or None where there is none (or only an interrupted start)."""
        if not (path / "zarr.json").is_file():
            return None
        group = zarr.open_group(str(path), mode="r+")
        if PIXEL_KEY not in group.attrs:
            return None
        return cls(path, group)

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self.group.attrs.asdict()[PIXEL_KEY])  # type: ignore[arg-type]

    @property
    def is_complete(self) -> bool:
        return self.meta.get("status") == "complete"

    @property
    def size(self) -> tuple[int, int]:
        h, w = self.meta["size"]
        return int(h), int(w)

    def array(self, split: str, name: str) -> Any:
        return self.group[f"{split}/{name}"]

    def pending_chunks(self, split: str) -> list[int]:
        return [int(i) for i in np.flatnonzero(~np.asarray(self.array(split, "done")[:]))]

    def nbytes_stored(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    @classmethod
    def create(
        cls, path: Location, dataset: Dataset, geometry: str, size: tuple[int, int], chunk_rows: int
    ) -> PixelStore:
        group = zarr.open_group(str(path), mode="w", zarr_format=3)
        h, w = size
        for split, s in dataset.splits.items():
            n = len(s)
            g = group.create_group(split)
            rows = max(1, min(chunk_rows, n))
            g.create_array(  # uncompressed: a chunk file is the rows' bytes, read in one call
                "pixels",
                shape=(n, h, w, 3),
                chunks=(rows, h, w, 3),
                dtype="uint8",
                compressors=None,
                fill_value=0,
            )
            g.create_array("valid", shape=(n,), chunks=(rows,), dtype="bool")
            g.create_array("errors", shape=(n,), chunks=(rows,), dtype=str)
            g.create_array(
                "done", shape=(max(1, -(-n // rows)),), chunks=(1,), dtype="bool", fill_value=False
            )
        # the metadata goes last: a store without it is an interrupted start, rebuilt anew
        group.attrs[PIXEL_KEY] = {
            "format_version": PIXEL_FORMAT,
            "dataset": {"spec": dataset.spec, "fingerprint": dataset.fingerprint},
            "geometry": geometry,
            "size": list(size),
            "splits": {k: len(v) for k, v in dataset.splits.items()},
            "chunk_rows": chunk_rows,
            "status": "partial",
            "created": _now(),
        }
        return cls(path, group)

    def update_meta(self, **fields: Any) -> None:
        self.group.attrs[PIXEL_KEY] = {**self.meta, **fields, "updated": _now()}


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
    path = pixel_store_path(dataset, geometry_desc, size, cache_dir)
    with StoreLock(path):
        store = PixelStore.open(path)
        if store is not None and store.is_complete:
            return store, False, 0.0
        if store is None:
            store = PixelStore.create(path, dataset, geometry_desc, size, chunk_rows)
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
            )
            arrays = tuple(store.array(split, k) for k in ("pixels", "valid", "errors", "done"))
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


def _write_chunk(
    arrays: tuple[Any, ...], c: int, start: int, stop: int, images: Any, ok: Any, reasons: Any
) -> None:
    pix, valid, errors, done = arrays
    pix[start:stop] = images.permute(0, 2, 3, 1).numpy()
    valid[start:stop] = ok.numpy()
    errors[start:stop] = np.array(reasons, dtype=str)
    done[c] = True  # only after the chunk's arrays are on disk


class PixelSource(torch.utils.data.Dataset[Batch]):
    """Batches of cached pixels, the same contract as `ImageSource`.

    `read_into` copies rows from the chunk files straight into a given array (pinned memory for
    the GPU): one copy, with the GIL released, so reader threads scale. Arrays that are not
    plain uncompressed chunks (or chunks never written: all fill) go through Zarr.
    """

    def __init__(self, path: Location, split: str):
        self.path, self.split = path, split
        store = PixelStore.open(path)
        if store is None or not store.is_complete:
            raise StoreError(f"pixel store {str(path)!r} is missing or incomplete.")
        self.n = int(store.meta["splits"][split])
        arr = store.array(split, "pixels")
        self.shape = tuple(int(v) for v in arr.shape[1:])
        self.rows = int(arr.chunks[0])
        meta = json.loads((path / split / "pixels" / "zarr.json").read_text())
        plain = {"name": "default", "configuration": {"separator": "/"}}
        self.raw = (  # chunk files are read directly where they are plain files on a local disk
            not is_remote(path)
            and [c["name"] for c in meta["codecs"]] == ["bytes"]
            and meta["chunk_key_encoding"] == plain
        )
        self.valid = np.ones(self.n, dtype=bool)
        self.errors: list[str] | None = None  # why each row is invalid; None: none is
        if store.meta.get("invalid", {}).get(split, -1) != 0:  # some are, or not recorded
            self.valid = np.asarray(store.array(split, "valid")[:], dtype=bool)
            self.errors = [str(e) for e in store.array(split, "errors")[:]]
        self._pid, self._zarr = -1, None

    def __len__(self) -> int:
        return self.n

    def _array(self) -> Any:
        if self._zarr is None or self._pid != os.getpid():  # a forked worker opens its own
            store = PixelStore.open(self.path)
            assert store is not None
            self._zarr, self._pid = store.array(self.split, "pixels"), os.getpid()
        return self._zarr

    def read_into(self, indices: list[int], out: np.ndarray) -> Batch:
        """Rows `indices` into `out` (len(indices), H, W, 3) uint8; return the batch tuple."""
        row_bytes = int(np.prod(self.shape))
        lo, hi = min(indices), max(indices) + 1
        if self.raw and indices == list(range(lo, hi)):
            flat = out.reshape(hi - lo, row_bytes)
            read_rows(str(self.path), self.split, self.rows, lo, hi, flat)
        else:
            arr = self._array()
            sel = np.asarray(indices)
            out[...] = arr.get_orthogonal_selection((sel, slice(None), slice(None), slice(None)))
        valid = torch.from_numpy(self.valid[indices].copy())
        images = torch.from_numpy(out).permute(0, 3, 1, 2)  # NHWC memory as NCHW: channels-last
        return images, valid, self.reasons(indices)

    def reasons(self, indices: Sequence[int]) -> list[str]:
        """Why each of rows `indices` is invalid ("" where it is valid)."""
        errors = self.errors
        return [""] * len(indices) if errors is None else [errors[i] for i in indices]

    def __getitems__(self, indices: list[int]) -> Batch:
        out = np.empty((len(indices), *self.shape), dtype=np.uint8)
        return self.read_into(indices, out)

    def __getitem__(self, index: int) -> Batch:
        return self.__getitems__([index])
