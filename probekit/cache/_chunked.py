"""What the feature and pixel stores share: a Zarr v3 group whose metadata sits under one
attribute key, written row chunk by row chunk, each chunk's `done` flag set after its arrays
(the resume unit), and a status that turns "complete" once every chunk is done."""

from __future__ import annotations

import datetime as _dt
import json
import zlib
from typing import Any, ClassVar

import numpy as np
import zarr
import zarr.codecs

__all__ = [
    "BOX_CHUNK",
    "COMPRESSOR",
    "TOKEN_INNER_BYTES",
    "ChunkedStore",
    "inner_rows",
    "now",
    "values_crc",
]

# zstd with its checksums: a damaged chunk fails to decode instead of reading as other numbers
COMPRESSOR = zarr.codecs.ZstdCodec(level=1, checksum=True)


# a token array's row chunk is one Zarr shard of inner chunks of at most this many bytes: a
# read of a few rows decodes those inner chunks, never the whole row chunk (tens of MiB)
TOKEN_INNER_BYTES = 2**20


def inner_rows(shard_rows: int, row_bytes: int) -> int:
    """Rows of one inner chunk of a sharded array: a power of two that divides `shard_rows`
    (Zarr's rule), of at most `TOKEN_INNER_BYTES` (one row where a row is larger)."""
    cap = max(1, TOKEN_INNER_BYTES // max(1, row_bytes))
    rows = 1
    while rows * 2 <= cap and shard_rows % (rows * 2) == 0:
        rows *= 2
    return rows


def values_crc(values: np.ndarray) -> int:
    """The crc32 of one chunk's values as the store holds them: their bytes in the array's
    dtype (C order), or for strings their text as a JSON list in UTF-8."""
    v = np.asarray(values)
    if v.dtype.kind in "OUTS":
        text = json.dumps([str(s) for s in v.reshape(-1)], ensure_ascii=False)
        return zlib.crc32(text.encode("utf-8", "surrogatepass"))
    return zlib.crc32(np.ascontiguousarray(v).reshape(-1).view(np.uint8).data)


BOX_CHUNK = 65536  # rows of a chunk of a detection store's box table


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class ChunkedStore:
    """A store opened for reading (and, by its writer, writing): metadata under `META_KEY`."""

    META_KEY: ClassVar[str]

    def __init__(self, path: Any, group: zarr.Group):
        self.path = path
        self.group = group

    @property
    def meta(self) -> dict[str, Any]:
        meta: Any = self.group.attrs.asdict().get(self.META_KEY, {})
        return dict(meta)

    def update_meta(self, **fields: Any) -> None:
        self.group.attrs[self.META_KEY] = {**self.meta, **fields, "updated": now()}

    @property
    def is_complete(self) -> bool:
        return self.meta.get("status") == "complete"

    def array(self, split: str, name: str) -> Any:
        return self.group[f"{split}/{name}"]

    def num_chunks(self, split: str) -> int:
        return int(self.array(split, "done").shape[0])

    def pending_chunks(self, split: str) -> list[int]:
        """The row chunks of `split` not yet written whole."""
        done = np.asarray(self.array(split, "done")[:])
        return [int(i) for i in np.flatnonzero(~done)]

    def nbytes_stored(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())
