"""The Zarr v3 feature store: layout, metadata, chunk-level progress, readers and listing.

Layout of one store (a directory `<cache>/<dataset>/<backbone>-<key>.zarr`, plain Zarr v3):

    zarr.json                  attributes["probekit"]: config, versions, classes, status, ...
    <split>/labels             (N,) int64
    <split>/ids                (N,) string   image paths or generated ids
    <split>/valid              (N,) bool     False for images that could not be read
    <split>/errors             (N,) string   why an image is invalid ("" when valid)
    <split>/done               (n_chunks,)   bool, one Zarr chunk per row chunk: resume progress
    <split>/layer<i>/<pool>    (N, D) float16|float32, chunked along N
    <split>/head/embed         (N, D)        the model's pooled pre-logits embedding
    <split>/layer<i>/tokens    (N, T, D)     with --tokens: the layer's patch tokens (class and
                                             register tokens excluded), all or pooled to a grid
    <split>/boxes              (M, 8) float64: a detection store's boxes, a row a box (see
    <split>/box_offsets        (N + 1,) int64   `cache.boxes`), image i's rows offsets[i:i+2]
    <split>/box_scale          (N,) float64     each image's resize
    <split>/crc                (n_chunks, K) uint32: each row chunk's crc32 of the values of
                                             the K arrays named in `crc_arrays` (`verify`)

A row chunk is written whole (each array's chunk file is written atomically by Zarr's local
store: temp file + rename) before its `done` flag is set, so a killed run never counts a
half-written chunk.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import zarr
from zarr.core.sync import sync

from probekit.cache._chunked import COMPRESSOR, ChunkedStore, inner_rows, now
from probekit.cache.boxes import read_boxes, write_box_arrays
from probekit.cache.check import (
    CheckReport,
    Damage,
    check_store,
    expected_arrays,
    failing_chunk,
    values_crc,
)
from probekit.cache.location import Location, cache_root, is_remote, location
from probekit.cache.meta import FORMAT_VERSION, META_KEY, StoreMeta
from probekit.errors import ProbekitWarning, StoreError

__all__ = [
    "FORMAT_VERSION",
    "META_KEY",
    "FeatureStore",
    "Location",
    "StoreConfig",
    "StoreLock",
    "StoreMeta",
    "cache_root",
    "is_remote",
    "location",
    "open_for_reading",
    "open_for_resume",
    "open_store",
]

StoreDtype = Literal["float16", "float32"]


@dataclass(frozen=True)
class StoreConfig:
    """Everything that determines the stored numbers; its hash is the cache key."""

    dataset: str
    backbone: str  # timm name
    weights: str  # WeightsInfo.key
    preprocessing: Mapping[str, Any]
    layers: tuple[int, ...]
    pools: tuple[str, ...]
    dtype: StoreDtype
    precision: str
    tokens: str | None = None  # "all" or a grid side "8": each layer's patch tokens stored

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["preprocessing"] = json.loads(json.dumps(dict(self.preprocessing)))
        d["layers"], d["pools"] = list(self.layers), list(self.pools)
        if self.tokens is None:  # stores without tokens keep the key they always had
            del d["tokens"]
        return d

    @property
    def key(self) -> str:
        blob = json.dumps({"format": FORMAT_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def feature_names(self) -> list[str]:
        """Array names under a split group, e.g. ['layer11/cls', 'head/embed']."""
        return [f"layer{i}/{p}" for i in self.layers for p in self.pools] + ["head/embed"]

    @property
    def token_names(self) -> list[str]:
        """The token arrays under a split group, e.g. ['layer11/tokens'] (none without tokens)."""
        return [f"layer{i}/tokens" for i in self.layers] if self.tokens is not None else []


class StoreLock:
    """An exclusive advisory lock next to the store; the OS drops it when its holder dies."""

    def __init__(self, store_path: Location):
        # object stores have no locks: there one job writes a store at a time (the ranks of a
        # torchrun job never write the same chunk)
        self.remote = is_remote(store_path)
        self.path = store_path.with_name(store_path.name + ".lock")
        self._fd: int | None = None

    def __enter__(self) -> StoreLock:
        if self.remote:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StoreError(
                f"another probekit process (pid {holder}) is writing {self.path.name[:-5]}; "
                "wait for it to finish, then run again."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


_LAST_N = re.compile(r"^last(\d+)/(.+)$")


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    """Features side by side (one part: as stored; float16 next to float32: float32)."""
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


# a sharded array is read this many bytes of rows at a time (a bounded temporary)
SPAN_BYTES = 4 * 2**20


class FeatureStore(ChunkedStore):
    """A feature store opened for reading (and, for the extractor, writing)."""

    META_KEY = META_KEY

    def __init__(self, path: Location, group: zarr.Group):
        super().__init__(path, group)
        self._writing: dict[str, Any] = {}  # the writer's array handles, opened once

    # ---- metadata
    @property
    def info(self) -> StoreMeta:
        """The metadata, typed (checked when the store was opened)."""
        return StoreMeta.from_dict(self.meta, repr(str(self.path)))

    @property
    def splits(self) -> list[str]:
        return list(self.meta.get("splits", {}))

    @property
    def class_names(self) -> list[str]:
        return list(self.meta.get("class_names", []))

    @property
    def fingerprint(self) -> str | None:
        """The dataset's fingerprint: which images the rows are, in which order."""
        value = self.meta.get("dataset", {}).get("fingerprint")
        return None if value is None else str(value)

    @property
    def feature_names(self) -> list[str]:
        return list(self.meta.get("feature_names", []))

    def parts(self, name: str) -> list[str]:
        """The stored features a feature name reads: itself, or for `lastN/POOL` the model's
        last N layers with that pool, concatenated in layer order (DINO's linear evaluation of
        ViT-S: the class tokens of the last 4 blocks, `last4/cls`)."""
        stored = self.feature_names
        m = _LAST_N.match(name)
        if name in stored or m is None:  # an array of its own (or none: `_array` says so)
            return [name]
        n, pool = int(m[1]), m[2]
        total = int(self.meta.get("backbone", {}).get("num_layers") or 0)
        want = [f"layer{i}/{pool}" for i in range(max(0, total - n), total)]
        missing = [w for w in want if w not in stored]
        if not 1 <= n <= total or missing or not want:
            raise StoreError(
                f"feature {name!r} concatenates the model's last {n} layers (of {total}) pooled "
                f"by {pool}; the store lacks {', '.join(missing) or 'them'}: extract with "
                f"--layers last{n} --pool {pool}, or pick N from 1 to {total}."
            )
        return want

    def has_feature(self, name: str) -> bool:
        """Whether `name` is stored, or a `lastN/POOL` concatenation of stored features."""
        try:
            self.check_features([name])
        except StoreError:
            return False
        return True

    def check_features(self, names: Sequence[str]) -> list[str]:
        """`names` if each is stored or a `lastN/POOL` concatenation of stored ones; else a
        one-line error."""
        stored = self.feature_names
        for name in names:
            if name not in stored and not _LAST_N.match(name):
                raise StoreError(
                    f"unknown feature {name!r}; the store has {', '.join(stored)}, and "
                    "lastN/POOL concatenates its model's last N layers (e.g. last4/cls)."
                )
            self.parts(name)
        return list(names)

    def feature_dim(self, name: str) -> int:
        dims = self.meta["feature_dims"]
        return sum(int(dims[p]) for p in self.parts(name))

    # ---- token features (`extract --tokens`)
    @property
    def token_names(self) -> list[str]:
        """The stored token arrays, e.g. ['layer11/tokens'] (empty: a store without tokens)."""
        return list(self.meta.get("token_shapes", {}))

    def token_shape(self, name: str) -> tuple[int, int]:
        """(T, D): tokens per image and their width, of token array `name`."""
        shapes = self.meta.get("token_shapes", {})
        if name not in shapes:
            have = ", ".join(shapes) or "none: extract with --tokens all (or --tokens 8)"
            raise StoreError(f"store has no token array {name!r}; token arrays: {have}.")
        t, d = shapes[name]
        return int(t), int(d)

    def token_grid(self, name: str) -> tuple[int, int]:
        """(rows, columns) of token array `name`'s grid: its T tokens in row-major order."""
        t, _ = self.token_shape(name)
        layer = self.meta.get("tokens", {}).get("layers", {}).get(name, {})
        grid = tuple(int(v) for v in layer.get("grid", ()))
        if len(grid) != 2 or grid[0] * grid[1] != t:
            raise StoreError(
                f"store does not record the grid of its {t} tokens of {name!r}; re-extract it "
                "with --tokens (probekit extract ... --overwrite)."
            )
        return grid[0], grid[1]

    # ---- masks (segmentation datasets)
    @property
    def mask_shape(self) -> tuple[int, int] | None:
        """(H, W) of the stored masks (the model's input size), or None: no masks."""
        shape = self.meta.get("mask_shape")
        return None if shape is None else (int(shape[0]), int(shape[1]))

    def masks(self, split: str, rows: np.ndarray | None = None) -> np.ndarray:
        """(n, H, W) uint8 masks of `rows` (sorted indices; default all): one class index a
        pixel, 255 where no label counts."""
        if self.mask_shape is None:
            raise StoreError(
                f"store {self.path.name} has no masks: extract a segmentation dataset "
                "(digit-scenes, seg:PATH) to use dense probes."
            )
        m = self._read(split, "masks") if rows is None else self._read_rows(split, "masks", rows)
        n = len(self.class_names)
        beyond = (m != 255) & (m >= n)  # a label the store never writes: damage, not a class
        if beyond.any():
            raise StoreError(
                f"store {self.path.name} is damaged: {split}/masks hold label "
                f"{int(m[beyond].max())}, beyond the {n} classes; run `probekit verify "
                f"--repair {self.path}`."
            )
        return m

    def boxes(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A detection store's boxes of `split`: (table (M, 8), offsets (N + 1,), scales (N,)),
        checked; columns as `extraction.boxes.BOX_COLUMNS`, scales as `cache.boxes` says."""
        n = int(self.meta["splits"][split])
        return read_boxes(self.group, split, n, len(self.class_names), str(self.path))

    def write_boxes(self, boxes: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
        """Write every split's boxes anew (an extraction resuming a store whose boxes a repair
        made anew): the same values `create` wrote, the same crc32s."""
        crcs = {s: write_box_arrays(self.group, s, *tb) for s, tb in boxes.items()}
        self.update_meta(box_crc=crcs, box_counts={s: len(tb[0]) for s, tb in boxes.items()})

    def tokens(self, split: str, name: str, rows: np.ndarray | None = None) -> np.ndarray:
        """(n, T, D) tokens of `rows` (sorted indices; default all) of one layer."""
        self.token_shape(name)
        return self._read(split, name) if rows is None else self._read_rows(split, name, rows)

    # ---- readers
    def _array(self, split: str, name: str) -> Any:
        if split not in self.splits:
            raise StoreError(f"store has no split {split!r}; it has {', '.join(self.splits)}.")
        try:
            arr = self.group[f"{split}/{name}"]
        except KeyError:
            raise StoreError(
                f"store has no array {split}/{name}; features: {', '.join(self.feature_names)}."
            ) from None
        assert isinstance(arr, zarr.Array)
        return arr

    def _read(self, split: str, name: str, rows: slice | np.ndarray | None = None) -> np.ndarray:
        """Rows of one array (a slice, sorted indices, or all); a chunk that fails to decode is
        a one-line error naming the store, the array and the chunk."""
        arr = self._array(split, name)
        try:
            if rows is None:
                return np.asarray(arr[:])
            if isinstance(rows, slice):
                return np.asarray(arr[rows])
            return np.asarray(arr.get_orthogonal_selection((np.asarray(rows, dtype=np.int64),)))
        except StoreError:
            raise
        except Exception as e:  # zstd checksum, short chunk, wrong size: the chunk is damaged
            n = int(arr.shape[0])
            if rows is None:
                first, last = 0, n
            elif isinstance(rows, slice):
                first, last, _ = rows.indices(n)
            else:
                first, last = int(rows[0]), int(rows[-1]) + 1
            chunk = failing_chunk(arr, int((arr.shards or arr.chunks)[0]), first, last)
            where = f"chunk {chunk}" if chunk is not None else f"rows {first}-{last}"
            marked = chunk is not None and self._mark_damaged(split, name, chunk)
            todo = (
                "it is marked for redoing: rerun the `probekit extract` command that made it"
                if marked
                else f"`probekit verify --repair {self.path}` recomputes it"
            )
            raise StoreError(
                f"{where} of {split}/{name} in store {self.path} fails to decode "
                f"({type(e).__name__}: {str(e)[:80]}); {todo}."
            ) from None

    def _mark_damaged(self, split: str, name: str, chunk: int) -> bool:
        """Mark one chunk found damaged on reading for redoing, where this process may (a local
        writable store no extraction is writing); whether it did."""
        if is_remote(self.path) or not os.access(self.path, os.W_OK):
            return False
        try:
            with StoreLock(self.path):
                self.mark_for_redo(
                    CheckReport(str(self.path), False, (Damage(split, name, (chunk,), "decode"),))
                )
        except (StoreError, OSError):
            return False
        return True

    def check(self, *, full: bool = False) -> CheckReport:
        """The store's self-check (see `probekit.cache.check`): cheap by default, `full` decodes
        every chunk."""
        return check_store(
            self.group, self.info, str(self.path), full=full, num_classes=len(self.class_names)
        )

    def features(self, split: str, name: str = "head/embed") -> np.ndarray:
        """(N, D) features of one layer/pool (e.g. 'layer11/cls', or a concatenation such as
        'last4/cls'), invalid rows included (zeros)."""
        return _concat([self._read(split, p) for p in self.parts(name)])

    def iter_features(
        self,
        split: str,
        name: str = "head/embed",
        rows: int | None = None,
        start: int = 0,
        stop: int | None = None,
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Stream (start_row, block) over rows [start, stop) of a feature array, `rows` at a
        time (default: a chunk)."""
        parts = self.parts(name)
        arrs = [self._array(split, p) for p in parts]
        step = rows or int((arrs[0].shards or arrs[0].chunks)[0])
        end = int(arrs[0].shape[0]) if stop is None else min(stop, int(arrs[0].shape[0]))
        for first in range(start, end, step):
            last = min(first + step, end)
            yield first, _concat([self._read(split, p, slice(first, last)) for p in parts])

    def read_rows(self, split: str, name: str, rows: np.ndarray) -> np.ndarray:
        """Rows `rows` (sorted indices) of a feature, reading only the chunks that hold them."""
        return _concat([self._read_rows(split, p, rows) for p in self.parts(name)])

    def _read_rows(self, split: str, name: str, rows: np.ndarray) -> np.ndarray:
        if not len(rows):
            return self._read(split, name, slice(0, 0))
        arr = self._array(split, name)
        if arr.shards is not None:
            return self._read_sharded(split, name, np.asarray(rows, dtype=np.int64), arr)
        first, last = int(rows[0]), int(rows[-1]) + 1
        if 2 * len(rows) >= last - first:  # dense: read the span, then pick
            span = self._read(split, name, slice(first, last))
            return span if len(rows) == last - first else span[np.asarray(rows) - first]
        return self._read(split, name, np.asarray(rows))

    def _read_sharded(self, split: str, name: str, rows: np.ndarray, arr: Any) -> np.ndarray:
        """Rows of a sharded (token) array as slices over runs of touched inner chunks, a few
        MiB at a time: Zarr's own fancy indexing of a shard decodes it again and again, and
        holds far more than the rows asked for."""
        unit = int(arr.chunks[0])
        row_bytes = int(np.prod(arr.shape[1:])) * arr.dtype.itemsize
        span_units = max(1, SPAN_BYTES // (unit * row_bytes))
        out = np.empty((len(rows), *arr.shape[1:]), dtype=arr.dtype)
        units = rows // unit
        cuts = np.flatnonzero(np.diff(units) > 1) + 1  # a skipped inner chunk ends a run
        for run in np.split(np.arange(len(rows)), cuts):
            start = 0
            while start < len(run):
                # rows of this run within `span_units` inner chunks of its first row
                limit = units[run[start]] + span_units
                stop = start + int(np.searchsorted(units[run[start:]], limit))
                idx = run[start:stop]
                lo, hi = int(rows[idx[0]]), int(rows[idx[-1]]) + 1
                span = self._read(split, name, slice(lo, hi))
                out[idx] = span if hi - lo == len(idx) else span[rows[idx] - lo]
                start = stop
        return out

    def labels(self, split: str) -> np.ndarray:
        return self._read(split, "labels")

    def valid(self, split: str) -> np.ndarray:
        """Rows holding features: read without error, in a chunk marked done (a chunk being
        written, or cut short by a kill, is never counted)."""
        valid = self._read(split, "valid")
        if not self.is_complete:
            done = self._read(split, "done")
            valid &= np.repeat(done, int(self.meta["chunk_rows"]))[: len(valid)]
        return valid

    def usable(self, split: str) -> np.ndarray:
        """`valid(split)`, or a one-line error when no row of the split can be used."""
        valid = self.valid(split)
        if not valid.any():
            reasons: dict[str, int] = {}
            for _, why in self.invalid(split):
                reasons[why] = reasons.get(why, 0) + 1
            said = ", ".join(f"{why}: {n}" for why, n in sorted(reasons.items())) or "no rows"
            raise StoreError(
                f"split {split!r} of {self.path.name} has no usable rows ({said}); "
                f"see `probekit info {self.path}`."
            )
        return valid

    def ids(self, split: str) -> list[str]:
        return [str(s) for s in self._read(split, "ids")]

    def invalid(self, split: str) -> list[tuple[str, str]]:
        """(id, reason) of each image that could not be read."""
        valid = self.valid(split)
        if valid.all():
            return []
        ids, errors = self.ids(split), self._read(split, "errors")
        return [(ids[i], str(errors[i])) for i in np.flatnonzero(~valid)]

    def tensors(self, split: str, name: str = "head/embed", device: str = "cpu") -> Any:
        """(features, labels) as torch tensors on `device`."""
        import torch

        return (
            torch.from_numpy(self.features(split, name)).to(device),
            torch.from_numpy(self.labels(split)).to(device),
        )

    # ---- writer side (used by probekit.extraction)
    @classmethod
    def create(
        cls,
        path: Location,
        config: StoreConfig,
        meta: Mapping[str, Any],
        split_sizes: Mapping[str, int],
        dims: Mapping[str, int],
        chunk_rows: int,
        float32_features: set[str],
        token_shapes: Mapping[str, tuple[int, int]] | None = None,
        mask_shape: tuple[int, int] | None = None,
        boxes: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None,
    ) -> FeatureStore:
        """A new store: every array made empty (features (N, D); tokens (N, T, D) with
        `token_shapes` {name: (T, D)}; masks (N, H, W) uint8 with `mask_shape` (H, W)),
        metadata written last (status partial)."""
        shapes = {k: (int(v[0]), int(v[1])) for k, v in (token_shapes or {}).items()}
        crc_arrays = ["labels", "valid", "ids", "errors", *config.feature_names, *shapes]
        crc_arrays += ["masks"] if mask_shape is not None else []
        group = zarr.open_group(str(path), mode="w", zarr_format=3)
        store = cls(path, group)
        for split, n in split_sizes.items():
            g = group.create_group(split)
            n_chunks = max(1, -(-n // chunk_rows))
            rows = (max(1, min(chunk_rows, n)),)
            for name, dtype in (("labels", "int64"), ("valid", "bool")):
                g.create_array(name, shape=(n,), chunks=rows, dtype=dtype, compressors=COMPRESSOR)
            for name in ("ids", "errors"):
                g.create_array(name, shape=(n,), chunks=rows, dtype=str, compressors=COMPRESSOR)
            g.create_array("done", shape=(n_chunks,), chunks=(1,), dtype="bool", fill_value=False)
            for name in config.feature_names:
                store._create_feature(
                    split,
                    name,
                    n,
                    (dims[name],),
                    chunk_rows,
                    "float32" if name in float32_features else config.dtype,
                )
            for name, shape in shapes.items():
                dtype = "float32" if name in float32_features else config.dtype
                store._create_feature(split, name, n, shape, chunk_rows, dtype)
            if mask_shape is not None:
                store._create_feature(split, "masks", n, tuple(mask_shape), chunk_rows, "uint8")
            k = len(crc_arrays)
            g.create_array(
                "crc", shape=(n_chunks, k), chunks=(1, k), dtype="uint32", compressors=COMPRESSOR
            )
        box_meta: dict[str, Any] = {}
        if boxes is not None:  # the boxes depend on the images alone: written whole, now
            box_meta = {
                "box_counts": {s: len(tb[0]) for s, tb in boxes.items()},
                "box_crc": {s: write_box_arrays(group, s, *tb) for s, tb in boxes.items()},
            }
        group.attrs[META_KEY] = {
            **meta,
            "format_version": FORMAT_VERSION,
            "cache_key": config.key,
            "config": config.to_dict(),
            "splits": dict(split_sizes),
            "chunk_rows": chunk_rows,
            "feature_names": config.feature_names,
            "feature_dims": dict(dims),
            "float32_features": sorted(float32_features),
            "token_shapes": {k: list(v) for k, v in shapes.items()},
            "mask_shape": None if mask_shape is None else list(mask_shape),
            "status": "partial",
            # every chunk of every array is written, fill values too: a missing file is damage
            "chunk_files": "all",
            "crc_arrays": crc_arrays,
            **box_meta,
            "created": now(),
            "updated": now(),
        }
        return store

    def _create_feature(
        self, split: str, name: str, n: int, row: tuple[int, ...], chunk_rows: int, dtype: str
    ) -> None:
        """One feature array (n, *row), chunked along its rows alone; token arrays (n, T, D)
        as one shard per row chunk, of inner chunks of a few rows (`inner_rows`)."""
        rows = max(1, min(chunk_rows, n))
        layout: dict[str, Any] = {"chunks": (rows, *row)}
        if len(row) == 2:
            inner = inner_rows(rows, int(np.prod(row)) * np.dtype(dtype).itemsize)
            layout = {"chunks": (inner, *row), "shards": (rows, *row)}
        self.group.create_array(
            f"{split}/{name}",
            shape=(n, *row),
            dtype=dtype,
            compressors=COMPRESSOR,
            fill_value=0,
            overwrite=True,
            **layout,
        )

    def write_chunk(
        self,
        split: str,
        chunk: int,
        chunk_rows: int,
        columns: Mapping[str, np.ndarray],
        mark_done: bool = True,
    ) -> None:
        """Write every array's rows of one chunk and their crc32s, then (only then) mark the
        chunk done (a part written ahead of the chunk's features, e.g. its masks:
        `mark_done=False`)."""
        start = chunk * chunk_rows
        arrays = [self._node(f"{split}/{name}") for name in columns]
        crc = self._crc_row(split, chunk, columns, arrays)

        async def write_all() -> None:  # the arrays concurrently, one pass through Zarr's loop
            rows = [slice(start, start + len(v)) for v in columns.values()]
            # a shard written anew, never merged into what a redone chunk left: Zarr reads an
            # existing edge shard back, and a damaged one would fail the write
            await asyncio.gather(
                *(
                    (a.async_array.store_path / a.metadata.encode_chunk_key((chunk, 0, 0))).delete()
                    for a in arrays
                    if a.shards is not None
                )
            )
            await asyncio.gather(
                *(
                    a.async_array.setitem(r, v)
                    for a, r, v in zip(arrays, rows, columns.values(), strict=True)
                )
            )

        sync(write_all())
        if crc is not None:
            self._node(f"{split}/crc")[chunk] = crc
        if mark_done:
            self._node(f"{split}/done")[chunk] = True

    def _crc_row(
        self, split: str, chunk: int, columns: Mapping[str, np.ndarray], arrays: list[Any]
    ) -> np.ndarray | None:
        """Row `chunk` of `<split>/crc` with the crc32 of `columns` as their arrays hold them
        (the other columns as recorded; None: the store records no crc)."""
        names = [str(n) for n in self.meta.get("crc_arrays", [])]
        if not names:
            return None
        if set(names) <= set(columns):
            row = np.zeros(len(names), dtype=np.uint32)
        else:  # a part written apart (masks): keep what the rest of the row says
            try:
                row = np.asarray(self._node(f"{split}/crc")[chunk], dtype=np.uint32)
            except Exception:  # a damaged row: the chunk is being redone whole anyway
                row = np.zeros(len(names), dtype=np.uint32)
        for (name, v), a in zip(columns.items(), arrays, strict=True):
            if name in names:
                held = v if a.dtype.kind in "OUTS" else np.asarray(v, dtype=a.dtype)
                row[names.index(name)] = values_crc(held)
        return row

    def _node(self, path: str) -> Any:
        node = self._writing.get(path)
        if node is None:
            node = self.group[path]
            assert isinstance(node, zarr.Array)
            if not path.endswith("/done"):  # a done flag's absence is what "not done" is
                node = node.with_config({"write_empty_chunks": True})
            self._writing[path] = node
        return node

    def mark_for_redo(self, report: CheckReport) -> list[str]:
        """Make a damaged store a partial one that an extraction completes: arrays whose
        metadata is wrong are made anew, each damaged chunk's done flag is cleared (its rows are
        then never read); returns what was found, one text per damaged array."""
        if report.ok:
            return []
        meta = self.info
        self._writing.clear()
        for d in report.damage:
            if d.whole:
                spec = next(a for a in expected_arrays(meta, d.split) if a.name == d.array)
                self._remake(d.split, spec.name, spec.shape, spec.dtype, spec.chunks)
        for split, chunks in report.redo().items():
            done = self._node(f"{split}/done")
            for c in chunks:
                done[c] = False
        self.update_meta(status="partial")
        return [d.counted() for d in report.damage]

    def _remake(
        self, split: str, name: str, shape: tuple[int, ...], dtype: str, chunks: tuple[int, ...]
    ) -> None:
        """One array created anew (empty) with the layout `create` gives it."""
        if len(shape) == 3:  # tokens
            self._create_feature(split, name, shape[0], shape[1:], chunks[0], dtype)
            return
        kind = {"string": str}.get(dtype, dtype)
        fill: Any = {"string": "", "bool": False}.get(dtype, 0)
        self.group.create_array(
            f"{split}/{name}",
            shape=shape,
            chunks=chunks,
            dtype=kind,
            compressors="auto" if name == "done" else COMPRESSOR,
            fill_value=fill,
            overwrite=True,
        )

    def switch_to_float32(self, name: str) -> None:
        """Keep feature `name` in float32 from now on: reset progress, recreate its arrays.

        Progress is reset first, so a kill in between leaves a store that simply redoes work.
        """
        for split in self.splits:
            self._node(f"{split}/done")[:] = False
        self._writing.clear()  # the feature's arrays are created anew
        f32 = sorted({*self.meta.get("float32_features", []), name})
        self.update_meta(float32_features=f32)
        meta = self.meta
        shapes = meta.get("token_shapes", {})
        row = tuple(shapes[name]) if name in shapes else (meta["feature_dims"][name],)
        for split, n in meta["splits"].items():
            self._create_feature(split, name, n, row, meta["chunk_rows"], "float32")

    def remove_partial_files(self) -> int:
        """Delete temp files a killed writer left behind; return how many."""
        if is_remote(self.path):  # object stores write whole objects: no partial files
            return 0
        stale = list(self.path.rglob("*.partial"))
        for f in stale:
            f.unlink(missing_ok=True)
        return len(stale)


def open_store(
    path: str | os.PathLike[str], *, allow_partial: bool = False, check: bool = True
) -> FeatureStore:
    """Open a feature store directory for reading (plain Zarr v3 under the hood).

    `check` (default): the store's cheap self-check (metadata and a listing); a damaged store
    is a one-line error naming what is damaged."""
    p = location(path)
    if not (p / "zarr.json").is_file():
        raise StoreError(
            f"{str(p)!r} is not a probekit feature store (no zarr.json); "
            "see `probekit ls` for the stores in the cache."
        )
    group = (
        zarr.open_group(str(p), mode="r+", zarr_format=3)
        if is_remote(p) or os.access(p, os.W_OK)  # object stores check rights on write
        else zarr.open_group(str(p), mode="r", zarr_format=3)
    )
    store = FeatureStore(p, group)
    StoreMeta.from_dict(store.meta, repr(str(p)))  # checked once: format version, every field
    if check:
        report = store.check()
        if not report.ok:
            raise StoreError(report.message())
    if not store.is_complete and not allow_partial:
        raise StoreError(
            f"{str(p)!r} is incomplete (an extraction was interrupted or is running); "
            "rerun the same `probekit extract` command to finish it, or read the rows "
            "written so far with --allow-partial."
        )
    return store


def open_for_resume(path: Location, fingerprint: str, spec: str) -> FeatureStore | None:
    """The store at `path` to reuse (complete) or resume (partial), or None where it must be
    made anew (there is none, or its creation was interrupted before the metadata was written).
    A store of other images than `fingerprint` says is a one-line error (never resumed). The
    store is not checked here: the caller checks it and marks what is damaged for redoing."""
    if not path.exists():
        return None
    try:
        store = open_store(path, allow_partial=True, check=False)
    except StoreError:
        try:  # the metadata is written last: without it, creation was interrupted
            interrupted = META_KEY not in zarr.open_group(str(path), mode="r").attrs
        except (FileNotFoundError, ValueError, KeyError, zarr.errors.GroupNotFoundError):
            interrupted = True
        if not interrupted:
            raise
        return None
    if store.fingerprint != fingerprint:
        state = "complete" if store.is_complete else "partial"
        raise StoreError(
            f"dataset {spec!r} changed since the {state} store {path.name} was written "
            "(files added, removed or modified); rerun with --overwrite to extract it anew."
        )
    return store


def open_for_reading(
    source: FeatureStore | str | os.PathLike[str], *, allow_partial: bool = False
) -> FeatureStore:
    """A store for knn/probe: complete, or (allow_partial) the chunks written so far, said in a
    warning; rows of unwritten chunks are invalid and never read."""
    store = source if isinstance(source, FeatureStore) else open_store(source, allow_partial=True)
    if not store.is_complete:
        if not allow_partial:
            open_store(store.path)  # raises the one-line error
        total = sum(store.num_chunks(s) for s in store.splits)
        done = total - sum(len(store.pending_chunks(s)) for s in store.splits)
        warnings.warn(
            f"{store.path.name} is incomplete: using the {done} of {total} chunks written so "
            "far (--allow-partial); numbers will change when it is complete.",
            ProbekitWarning,
            stacklevel=2,
        )
    return store
