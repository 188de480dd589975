"""A feature store checks itself: every array's metadata against the store's config, every done
chunk's files, the done flags against the status (cheap: metadata and one listing, no chunk
read), and on demand every chunk decoded (`verify`). What is damaged is named chunk by chunk, so
an extraction recomputes exactly those chunks.

A store records in its metadata `chunk_files: "all"` when every chunk of every array is written
(even one of fill values); only then is a missing chunk file damage. Stores written before that
are checked on everything else.

A store also records, as each row chunk is written, the crc32 of every array's values in that
chunk (`<split>/crc`, one row per row chunk, one column per array named in `crc_arrays`). Each
chunk file already carries zstd's checksum of its own bytes, which catches a flipped bit but not
a whole valid chunk copied over another: the full check compares each decoded chunk's crc32 with
the recorded one, so a chunk holding other rows' values is damage too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from zarr.core.sync import sync

from probekit.cache._chunked import BOX_CHUNK, values_crc
from probekit.cache.boxes import box_problem
from probekit.cache.meta import StoreMeta

__all__ = [
    "ArraySpec",
    "CheckReport",
    "Damage",
    "check_store",
    "expected_arrays",
    "failing_chunk",
    "summarize",
    "values_crc",
]


@dataclass(frozen=True)
class ArraySpec:
    """What one array of a split must be."""

    name: str  # under the split: "labels", "layer4/mean", ...
    shape: tuple[int, ...]
    dtype: str  # Zarr's data_type: "int64", "bool", "string", "float16", "float32"
    chunks: tuple[int, ...]
    # written whole when the store is made (the boxes), not row chunk by row chunk
    whole_array: bool = False

    @property
    def row_chunk(self) -> int:
        """Rows per chunk (the done array: one flag per chunk)."""
        return self.chunks[0]

    def chunk_key(self, split: str, chunk: int) -> str:
        """The chunk file of row chunk `chunk` (Zarr's default keys, "/" separated)."""
        rest = "/0" * (len(self.shape) - 1)
        return f"{split}/{self.name}/c/{chunk}{rest}"


@dataclass(frozen=True)
class Damage:
    """One damaged array of a split: some of its row chunks, or the whole array."""

    split: str
    array: str
    chunks: tuple[int, ...]  # the row chunks to recompute
    reason: str  # "missing", "fails to decode", "metadata: ...", "done flag cleared"
    whole: bool = False  # the array itself must be made anew (its metadata is wrong)

    def describe(self) -> str:
        n = len(self.chunks)
        what = "chunk" if n == 1 else "chunks"
        which = f"{what} {', '.join(map(str, self.chunks[:5]))}" + (" ..." if n > 5 else "")
        if not n:  # an array written whole (the boxes): rewritten, no row chunk redone
            return f"{self.split}/{self.array} ({self.reason})"
        if self.whole:
            return f"{self.split}/{self.array} ({self.reason}; all {n} {what})"
        return f"{which} of {self.split}/{self.array} ({self.reason})"

    def counted(self) -> str:
        """ "3 chunks of train/layer4/mean (chunk file missing)": what a repair redid."""
        n = len(self.chunks)
        if not n:
            return f"{self.split}/{self.array} ({self.reason})"
        return f"{n} chunk{'s' if n != 1 else ''} of {self.split}/{self.array} ({self.reason})"


@dataclass(frozen=True)
class CheckReport:
    """What a check found (`damage` empty: the store is sound)."""

    store: str
    full: bool  # every chunk was decoded
    damage: tuple[Damage, ...] = ()
    chunks_read: int = 0
    chunks: int = 0  # row chunks of every split
    pending: int = 0  # of them not done yet (an incomplete store's)

    @property
    def ok(self) -> bool:
        return not self.damage

    def redo(self) -> dict[str, list[int]]:
        """Per split, the row chunks to recompute."""
        out: dict[str, set[int]] = {}
        for d in self.damage:
            out.setdefault(d.split, set()).update(d.chunks)
        return {s: sorted(c) for s, c in out.items()}

    def count(self) -> int:
        return sum(len(c) for c in self.redo().values())

    def message(self) -> str:
        """One line: what is damaged and what to do."""
        first = "; ".join(d.describe() for d in self.damage[:3])
        more = f"; and {len(self.damage) - 3} more" if len(self.damage) > 3 else ""
        return (
            f"store {self.store} is damaged: {first}{more}. Rerun the `probekit extract` command "
            f"that made it to recompute exactly those chunks, or `probekit verify --repair "
            f"{self.store}`."
        )


def expected_arrays(meta: StoreMeta, split: str) -> list[ArraySpec]:
    """The arrays of one split as `FeatureStore.create` makes them from `meta`."""
    n = int(meta.splits[split])
    rows = max(1, min(meta.chunk_rows, n))
    n_chunks = max(1, -(-n // meta.chunk_rows))
    f32 = set(meta.float32_features)
    store_dtype = str(meta.config.get("dtype", "float16"))
    out = [
        ArraySpec("labels", (n,), "int64", (rows,)),
        ArraySpec("valid", (n,), "bool", (rows,)),
        ArraySpec("ids", (n,), "string", (rows,)),
        ArraySpec("errors", (n,), "string", (rows,)),
        ArraySpec("done", (n_chunks,), "bool", (1,)),
    ]
    for name in meta.feature_names:
        dim = int(meta.feature_dims[name])
        dtype = "float32" if name in f32 else store_dtype
        out.append(ArraySpec(name, (n, dim), dtype, (rows, dim)))
    for name, (t, d) in meta.token_shapes.items():
        dtype = "float32" if name in f32 else store_dtype
        out.append(ArraySpec(name, (n, t, d), dtype, (rows, t, d)))
    if meta.mask_shape is not None:
        h, w = meta.mask_shape
        out.append(ArraySpec("masks", (n, h, w), "uint8", (rows, h, w)))
    if split in meta.box_counts:
        m = int(meta.box_counts[split])
        out.append(ArraySpec("boxes", (m, 8), "float64", (max(1, min(m, BOX_CHUNK)), 8), True))
        out.append(ArraySpec("box_offsets", (n + 1,), "int64", (n + 1,), True))
        out.append(ArraySpec("box_scale", (n,), "float64", (max(1, n),), True))
    if meta.crc_arrays:
        k = len(meta.crc_arrays)
        out.append(ArraySpec("crc", (n_chunks, k), "uint32", (1, k)))
    return out


def _list_keys(store: Any) -> set[str]:
    """Every key of the Zarr store under the group (one listing)."""

    async def collect() -> list[str]:
        return [k async for k in store.list_prefix("")]

    # an object store's client caches listings: fresh ones here, and none kept after (a chunk
    # written later by another process must not read as missing from a stale listing)
    fs = getattr(store, "fs", None)
    forget = getattr(fs, "invalidate_cache", None)
    if callable(forget):
        forget()
    try:
        return set(sync(collect()))
    finally:
        if callable(forget):
            forget()


def _metadata_problem(arr: Any, spec: ArraySpec) -> str | None:
    md = arr.metadata.to_dict()
    shape = tuple(int(v) for v in md.get("shape", ()))
    if shape != spec.shape:
        return f"shape {list(shape)} where the store says {list(spec.shape)}"
    dtype = str(md.get("data_type"))
    if dtype != spec.dtype:
        return f"dtype {dtype} where the store says {spec.dtype}"
    grid = md.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape", ())
    if tuple(int(v) for v in grid) != spec.chunks:
        return f"chunks {list(grid)} where the store says {list(spec.chunks)}"
    return _encoding_problem(md, spec)


def _codecs(items: Any) -> list[Mapping[str, Any]]:
    return [c if isinstance(c, Mapping) else {"name": c} for c in items]


def _endian(codec: Mapping[str, Any]) -> str | None:
    """A bytes codec's endianness where it is not little (None where it is, or says none)."""
    endian = (codec.get("configuration") or {}).get("endian", "little")
    return None if endian == "little" else str(endian)


def _encoding_problem(md: Mapping[str, Any], spec: ArraySpec) -> str | None:
    """What in an array's metadata would read its bytes as other values than the store wrote:
    its codecs (bytes little-endian, then zstd with its checksum; strings: vlen-utf8), fill
    value, chunk key encoding and storage transformers, against what the store writes."""
    codecs = _codecs(md.get("codecs", []))
    if len(spec.shape) == 3:  # tokens and masks: shards of inner chunks
        if [c.get("name") for c in codecs] != ["sharding_indexed"]:
            return f"codecs {[c.get('name') for c in codecs]} where the store writes shards"
        shard = codecs[0].get("configuration") or {}
        index = _codecs(shard.get("index_codecs", []))
        if [c.get("name") for c in index] != ["bytes", "crc32c"] or _endian(index[0]):
            return "a shard index the store never writes"
        codecs = _codecs(shard.get("codecs", []))
    names = [str(c.get("name")) for c in codecs]
    first = "vlen-utf8" if spec.dtype == "string" else "bytes"
    if names != [first, "zstd"]:
        return f"codecs {names} where the store writes {[first, 'zstd']}"
    if endian := _endian(codecs[0]):
        return f"{endian}-endian bytes where the store writes little-endian"
    if spec.name != "done" and not (codecs[1].get("configuration") or {}).get("checksum"):
        return "zstd without its checksum where the store writes one"
    expected: Any = "" if spec.dtype == "string" else (False if spec.dtype == "bool" else 0)
    fill = md.get("fill_value")
    if fill != expected or isinstance(fill, bool) != isinstance(expected, bool):
        return f"fill value {fill!r} where the store writes {expected!r}"
    key = md.get("chunk_key_encoding") or {}
    separator = (key.get("configuration") or {}).get("separator", "/")
    if key.get("name", "default") != "default" or separator != "/":
        return f"chunk key encoding {dict(key)} where the store writes default with '/'"
    if md.get("storage_transformers"):
        return "storage transformers the store never writes"
    return None


def check_store(
    group: Any, meta: StoreMeta, where: str, *, full: bool = False, num_classes: int | None = None
) -> CheckReport:
    """Check the store whose Zarr group is `group` against its metadata `meta`.

    Cheap (default): every array opens with the shape, dtype and chunking the config says;
    every chunk whose done flag is set has its files (where the store writes every chunk); a
    complete store has every done flag set. `full`: also decode every chunk of every array,
    and check that labels are class indices.
    """
    damage: list[Damage] = []
    keys = _list_keys(group.store)
    every_file = meta.raw.get("chunk_files") == "all"
    complete = meta.is_complete
    read = total = pending = 0
    for split in meta.splits:
        specs = expected_arrays(meta, split)
        n_chunks = specs[4].shape[0]
        everything = tuple(range(n_chunks))
        arrays: dict[str, Any] = {}
        for spec in specs:
            try:
                arr = group[f"{split}/{spec.name}"]
                problem = _metadata_problem(arr, spec)
            except Exception as e:  # whatever Zarr makes of damaged metadata, it is damage
                problem = f"metadata unreadable: {type(e).__name__}"
                arr = None
            if problem is not None:
                redo = () if spec.whole_array else everything
                damage.append(Damage(split, spec.name, redo, problem, whole=True))
            else:
                arrays[spec.name] = arr
        done = np.zeros(n_chunks, dtype=bool)
        if "done" in arrays:
            done, bad = _read_done(arrays["done"], n_chunks)
            read += n_chunks if full else 0
            if bad:
                damage.append(Damage(split, "done", tuple(bad), "fails to decode"))
        if complete and "done" in arrays:
            cleared = tuple(int(i) for i in np.flatnonzero(~done))
            bad_done = {
                c for d in damage if d.array == "done" and d.split == split for c in d.chunks
            }
            cleared = tuple(c for c in cleared if c not in bad_done)
            if cleared:
                damage.append(
                    Damage(split, "done", cleared, "done flag cleared in a complete store")
                )
        done_chunks = [int(i) for i in np.flatnonzero(done)]
        total += n_chunks
        pending += n_chunks - len(done_chunks)
        # an older store skipped chunks of fill values: there a missing feature chunk is
        # damage where its rows hold a valid image (a valid row's features are never all 0)
        needed = done_chunks if every_file else _chunks_with_valid_rows(arrays, specs, done_chunks)
        recorded = _read_crc(arrays.get("crc"), n_chunks, len(meta.crc_arrays)) if full else None
        for spec in specs:
            if spec.name == "done" or spec.name not in arrays:
                continue
            if spec.whole_array:
                damage += _whole_array_damage(arrays, spec, split, keys, meta, full, num_classes)
                continue
            if every_file or len(spec.shape) > 1:
                missing = tuple(c for c in needed if spec.chunk_key(split, c) not in keys)
                if missing:
                    damage.append(Damage(split, spec.name, missing, "chunk file missing"))
            if full:
                crcs = None
                if recorded is not None and spec.name in meta.crc_arrays:
                    crcs = recorded[:, meta.crc_arrays.index(spec.name)]
                found, n_read = _decoded_damage(
                    arrays[spec.name], spec, split, done_chunks, num_classes, crcs
                )
                damage += found
                read += n_read
    return CheckReport(where, full, tuple(damage), read, total, pending)


def _decoded_damage(
    arr: Any,
    spec: ArraySpec,
    split: str,
    chunks: list[int],
    num_classes: int | None,
    crcs: np.ndarray | None,
) -> tuple[list[Damage], int]:
    """The damage every done chunk of one array shows once decoded, and chunks read."""
    bad, odd, moved, n_read = _decode_all(arr, spec, chunks, num_classes, crcs)
    found = []
    for chunks_of, reason in (
        (bad, "fails to decode"),
        (odd, "holds values the store never writes"),
        (moved, "values differ from those written (crc32)"),
    ):
        if chunks_of:
            found.append(Damage(split, spec.name, tuple(chunks_of), reason))
    return found, n_read


def _whole_array_damage(
    arrays: Mapping[str, Any],
    spec: ArraySpec,
    split: str,
    keys: set[str],
    meta: StoreMeta,
    full: bool,
    num_classes: int | None,
) -> list[Damage]:
    """A box array's damage: a chunk file missing, or (full) one that fails to decode, values
    the store never writes, or a crc32 other than the one recorded when it was written."""
    n_own = -(-spec.shape[0] // spec.chunks[0])
    if any(spec.chunk_key(split, c) not in keys for c in range(n_own)):
        return [Damage(split, spec.name, (), "chunk file missing", whole=True)]
    if not full or spec.name != "boxes" or not {"box_offsets", "box_scale"} <= set(arrays):
        return []
    try:
        table = np.asarray(arrays["boxes"][:], dtype=np.float64).reshape(-1, 8)
        offsets = np.asarray(arrays["box_offsets"][:], dtype=np.int64)
        scales = np.asarray(arrays["box_scale"][:], dtype=np.float64)
    except Exception:
        return [Damage(split, "boxes", (), "fails to decode", whole=True)]
    problem = box_problem(table, offsets, scales, int(meta.splits[split]), num_classes)
    if problem is not None:
        return [Damage(split, "boxes", (), f"holds {problem}", whole=True)]
    recorded = (meta.raw.get("box_crc") or {}).get(split)
    crcs = [values_crc(table), values_crc(offsets), values_crc(scales)]
    if recorded is not None and crcs != list(recorded):
        return [Damage(split, "boxes", (), "values differ from those written (crc32)", True)]
    return []


def _chunks_with_valid_rows(
    arrays: Mapping[str, Any], specs: list[ArraySpec], chunks: list[int]
) -> list[int]:
    """The done chunks whose rows include a valid image (all of them where `valid` cannot be
    read: its own damage is said apart)."""
    if "valid" not in arrays:
        return chunks
    rows = specs[0].row_chunk
    try:
        valid = np.asarray(arrays["valid"][:], dtype=bool)
    except Exception:
        return chunks
    return [c for c in chunks if valid[c * rows : (c + 1) * rows].any()]


def _read_done(arr: Any, n_chunks: int) -> tuple[np.ndarray, list[int]]:
    """The done flags; a flag whose chunk fails to decode counts as not done (and is damage)."""
    try:
        return np.asarray(arr[:], dtype=bool), []
    except Exception:
        flags = np.zeros(n_chunks, dtype=bool)
        bad = []
        for i in range(n_chunks):
            try:
                flags[i] = bool(arr[i])
            except Exception:
                bad.append(i)
        return flags, bad


def _read_crc(arr: Any, n_chunks: int, k: int) -> np.ndarray | None:
    """The recorded crc32s (n_chunks, k) as int64, -1 where a row fails to decode (its own
    damage is said apart); None where the store records none."""
    if arr is None:
        return None
    try:
        return np.asarray(arr[:], dtype=np.int64)
    except Exception:
        out = np.full((n_chunks, k), -1, dtype=np.int64)
        for i in range(n_chunks):
            with contextlib.suppress(Exception):
                out[i] = np.asarray(arr[i], dtype=np.int64)
        return out


def _decode_all(
    arr: Any,
    spec: ArraySpec,
    chunks: Iterable[int],
    num_classes: int | None,
    crcs: np.ndarray | None = None,
) -> tuple[list[int], list[int], list[int], int]:
    """The row chunks of `arr` (among `chunks`) that fail to decode, those that hold values the
    store never writes, those whose values are not the ones written (their crc32 is not the
    recorded one, `crcs` by row chunk, -1: unknown), and how many were read."""
    bad: list[int] = []
    odd: list[int] = []
    moved: list[int] = []
    n = 0
    rows = spec.row_chunk
    for c in chunks:
        n += 1
        try:
            values = np.asarray(arr[c * rows : (c + 1) * rows])
        except Exception:
            bad.append(c)
            continue
        if _impossible(spec.name, values, num_classes):
            odd.append(c)
        elif crcs is not None and crcs[c] >= 0 and values_crc(values) != crcs[c]:
            moved.append(c)
    return bad, odd, moved, n


def _impossible(name: str, values: np.ndarray, num_classes: int | None) -> bool:
    """Values the store never writes: labels beyond the classes, mask labels beyond them (255
    is ignored), non-finite features or tokens (the writer makes such rows invalid zeros)."""
    if not len(values):
        return False
    if name == "labels" and num_classes is not None:
        return int(values.min()) < 0 or int(values.max()) >= num_classes
    if name == "masks" and num_classes is not None:
        return bool(((values != 255) & (values >= num_classes)).any())
    if np.issubdtype(values.dtype, np.floating):
        return not bool(np.isfinite(values).all())
    return False


def failing_chunk(arr: Any, rows: int, first: int, last: int) -> int | None:
    """The first row chunk between rows [first, last) of `arr` that fails to decode."""
    for c in range(first // rows, max(first // rows + 1, -(-last // rows))):
        try:
            np.asarray(arr[c * rows : (c + 1) * rows])
        except Exception:
            return c
    return None


def summarize(report: CheckReport) -> Mapping[str, Any]:
    """A JSON-able summary (`probekit verify --json`)."""
    return {**asdict(report), "ok": report.ok}
