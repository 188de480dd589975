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
    <split>/crc        (n_chunks,) uint32: each pixel chunk file's crc32, recorded as it is
                       written (stores made before it have none)

A pixel store checks itself as a feature store does: before it is read, every done chunk's
file is there at its exact size (an uncompressed chunk is rows x H x W x 3 bytes, edge chunks
padded), and `verify` also compares each file's crc32; a damaged chunk is marked for redoing
and decoded again, never read as zeros.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import zarr

from probekit.cache._chunked import ChunkedStore, now
from probekit.cache._files import read_rows
from probekit.cache.store import Location, cache_root, is_remote
from probekit.errors import StoreError

__all__ = [
    "PIXEL_CHUNK_ROWS",
    "PixelSource",
    "PixelStore",
    "pixel_store_path",
]

# a batch of pixels: uint8 (B, 3, H, W) in channels-last memory, valid (B,), reasons [B]
Batch = tuple[torch.Tensor, torch.Tensor, list[str]]

PIXEL_KEY = "probekit_pixels"
PIXEL_FORMAT = 1
# 64 rows of 224 x 224 x 3 = 9.6 MB per chunk: batches of 64 (or multiples) read whole chunks
PIXEL_CHUNK_ROWS = 64


def geometry_key(fingerprint: str, geometry: str, size: tuple[int, int]) -> str:
    blob = json.dumps(
        {"format": PIXEL_FORMAT, "data": fingerprint, "geometry": geometry, "size": size},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def pixel_store_path(
    dataset: str, fingerprint: str, geometry: str, size: tuple[int, int], cache_dir: Any = None
) -> Location:
    """`<cache>/<dataset name>/pixels/<key>.zarr`: one store per images x geometry."""
    key = geometry_key(fingerprint, geometry, size)
    return cache_root(cache_dir) / dataset / "pixels" / f"{key}.zarr"


class PixelStore(ChunkedStore):
    """A pixel store opened for reading or (by `extraction.pixels.build_pixel_store`) writing."""

    META_KEY = PIXEL_KEY

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
    def size(self) -> tuple[int, int]:
        h, w = self.meta["size"]
        return int(h), int(w)

    @classmethod
    def create(
        cls,
        path: Location,
        dataset: Mapping[str, str],
        splits: Mapping[str, int],
        geometry: str,
        size: tuple[int, int],
        chunk_rows: int,
    ) -> PixelStore:
        """An empty store for images of `splits` (name: rows) at `size`; `dataset`: its spec
        and fingerprint."""
        group = zarr.open_group(str(path), mode="w", zarr_format=3)
        h, w = size
        for split, n in splits.items():
            g = group.create_group(split)
            rows = max(1, min(chunk_rows, n))
            g.create_array(  # uncompressed: a chunk file is the rows' bytes, read in one call
                "pixels",
                shape=(n, h, w, 3),
                chunks=(rows, h, w, 3),
                dtype="uint8",
                compressors=None,
                fill_value=0,
                config={"write_empty_chunks": True},  # every done chunk has its file
            )
            n_chunks = max(1, -(-n // rows))
            # one element a chunk, as done: chunks are written by several threads at once
            g.create_array("crc", shape=(n_chunks,), chunks=(1,), dtype="uint32")
            g.create_array("valid", shape=(n,), chunks=(rows,), dtype="bool")
            g.create_array("errors", shape=(n,), chunks=(rows,), dtype=str)
            g.create_array(
                "done", shape=(max(1, -(-n // rows)),), chunks=(1,), dtype="bool", fill_value=False
            )
        # the metadata goes last: a store without it is an interrupted start, rebuilt anew
        group.attrs[PIXEL_KEY] = {
            "format_version": PIXEL_FORMAT,
            "dataset": {"spec": dataset["spec"], "fingerprint": dataset["fingerprint"]},
            "geometry": geometry,
            "size": list(size),
            "splits": dict(splits),
            "chunk_rows": chunk_rows,
            "status": "partial",
            "created": now(),
        }
        return cls(path, group)

    def chunk_file(self, split: str, chunk: int) -> Any:
        return self.path / split / "pixels" / "c" / str(chunk) / "0" / "0" / "0"

    def damaged_chunks(self, full: bool = False) -> dict[str, list[int]]:
        """Per split, the done chunks whose file is missing or not its exact size; `full`:
        also those whose bytes are not the crc32 recorded when they were written. A store on
        an object store is not checked (its reader is Zarr's)."""
        if is_remote(self.path):
            return {}
        out: dict[str, list[int]] = {}
        h, w = self.size
        for split in self.meta["splits"]:
            rows = int(self.array(split, "pixels").chunks[0])
            done = np.flatnonzero(np.asarray(self.array(split, "done")[:], dtype=bool))
            crc = self._crc(split)
            valid: np.ndarray | None = None
            for c in (int(i) for i in done):
                f = self.chunk_file(split, c)
                if not f.is_file():
                    if crc is None and valid is None:  # an older store skipped zero chunks
                        valid = np.asarray(self.array(split, "valid")[:], dtype=bool)
                    if crc is not None or (
                        valid is not None and valid[c * rows : (c + 1) * rows].any()
                    ):
                        out.setdefault(split, []).append(c)
                elif f.stat().st_size != rows * h * w * 3 or (
                    full and crc is not None and zlib.crc32(f.read_bytes()) != int(crc[c])
                ):
                    out.setdefault(split, []).append(c)
        return out

    def _crc(self, split: str) -> np.ndarray | None:
        try:
            return np.asarray(self.array(split, "crc")[:], dtype=np.uint32)
        except KeyError:
            return None

    def mark_for_redo(self, chunks: Mapping[str, Sequence[int]]) -> None:
        """Clear the done flags of `chunks`: the next build decodes exactly them again."""
        for split, cs in chunks.items():
            done = self.array(split, "done")
            for c in cs:
                done[c] = False
        self.update_meta(status="partial")


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
