"""Feature chunks written by a child process, off the extraction loop's interpreter.

Zarr writes run in Python (asyncio, codec dispatch); in the process that feeds a GPU they take
the GIL from the thread that must launch the next batch. Here the loop copies each batch's
features into a chunk buffer in shared memory and sends the child a short message per chunk;
the child checks the chunk (non-finite rows, float16 range), casts it and writes it with Zarr,
then hands the buffer back. `SLOTS` buffers: one filling, the others queued or being written;
a loop that finds none free waits for storage.

A chunk's `done` flag is set after its arrays (see `FeatureStore.write_chunk`), so a writer
killed mid-chunk leaves that chunk pending. The child dies with its parent (on Linux by a
parent-death signal, elsewhere it polls) and ignores Ctrl-C: the parent ends it once the
chunks it sent are written.

    with ChunkWriter() as writer:
        writer.begin(store_path, dims, "float16", set(), chunk_rows)
        buf = writer.acquire()      # buf.features (rows, sum of dims) float32, buf.valid (rows,)
        ...                         # fill the chunk's rows
        writer.submit(buf, split, chunk, rows, labels, ids, {row: reason})
        writer.wait()               # every chunk submitted is written (or its error raised)
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle
from typing import Any, NamedTuple, NoReturn

import numpy as np

from probekit.cache.child import (
    End,
    exit_code,
    picklable,
    run_child,
    serve,
    shared_memory,
    start_child,
)
from probekit.errors import StoreError

__all__ = ["FP16_MAX", "SLOTS", "ChunkBuffer", "ChunkWriter", "NeedsFloat32", "chunk_columns"]

FP16_MAX = float(np.finfo(np.float16).max)
SLOTS = 3


class Begin(NamedTuple):
    """Write chunks of the store at `path` (then the shared memory's handle follows)."""

    path: str
    dims: dict[str, int]  # features in the order of a buffer's columns
    dtype: str
    f32: list[str]  # features kept in float32
    chunk_rows: int
    shapes: dict[str, tuple[int, ...]]  # token arrays: each row's (T, D) (flat in buffers)


class Chunk(NamedTuple):
    """Rows [0, rows) of buffer `slot` are chunk `chunk` of `split`."""

    slot: int
    split: str
    chunk: int
    rows: int
    labels: np.ndarray
    ids: list[str]
    reasons: dict[int, str]  # why an invalid row could not be read, by row in the chunk


class Reply(NamedTuple):
    """The writer's answer: "begun" (to Begin), "done" or "error" (a chunk, its buffer free
    again), "ended" (to End)."""

    kind: str
    slot: int | None
    error: BaseException | None


class NeedsFloat32(Exception):
    """Feature `name` overflows float16: the store must keep it in float32 (and redo chunks)."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def chunk_columns(
    features: np.ndarray,
    valid: np.ndarray,
    reasons: np.ndarray,
    dims: Mapping[str, int],
    dtype: str,
    f32: set[str] | frozenset[str],
) -> dict[str, np.ndarray]:
    """One chunk's feature arrays as stored, with its valid flags and reasons.

    features: (n, sum of dims) float32, every feature side by side (changed in place);
    valid: (n,) bool; reasons: (n,) str. A row with a non-finite feature becomes invalid
    ("non-finite features"); invalid rows are zeros; features are cast to `dtype`, except those
    in `f32` (float32); a float16 feature that overflows raises `NeedsFloat32`.
    """
    finite = np.isfinite(features).all(axis=1)
    reasons = reasons.astype(object)
    reasons[~finite & valid] = "non-finite features"
    valid = valid & finite
    features[~valid] = 0.0
    peak = np.abs(features).max(axis=0, initial=0.0) if dtype == "float16" else None
    out: dict[str, np.ndarray] = {}
    start = 0
    for name, dim in dims.items():
        col = features[:, start : start + dim]
        if peak is not None and name not in f32:
            if peak[start : start + dim].max(initial=0.0) > FP16_MAX:
                raise NeedsFloat32(name)
            out[name] = col.astype(np.float16)
        else:
            out[name] = col.astype(np.float32)
        start += dim
    out["valid"] = valid
    out["errors"] = reasons.astype(str)
    return out


@dataclass
class ChunkBuffer:
    """One chunk's rows in shared memory: filled by the loop, read by the writer process."""

    slot: int
    features: np.ndarray  # (chunk_rows, sum of dims) float32
    valid: np.ndarray  # (chunk_rows,) bool


def _stride(rows: int, width: int) -> int:
    return -(-(rows * width * 4 + rows) // 64) * 64  # a slot's bytes, 64-byte aligned


def _buffers(shared: Any, rows: int, width: int) -> list[ChunkBuffer]:
    """The slots over one shared mapping: each slot's features, then its valid flags."""
    out = []
    for s in range(SLOTS):
        at = s * _stride(rows, width)
        feats = np.frombuffer(shared, np.float32, rows * width, at).reshape(rows, width)
        valid = np.frombuffer(shared, np.bool_, rows, at + rows * width * 4)
        out.append(ChunkBuffer(s, feats, valid))
    return out


class ChunkWriter:
    """The loop's side: starts the writer process, lends chunk buffers, takes its replies.

    Start it early (the child imports NumPy and Zarr meanwhile); `begin` before each pass.
    """

    def __init__(self) -> None:
        # NumPy, Zarr and the store module only (not the rest of probekit): a quick start
        self._proc, self._conn = start_child("probekit.cache.writer", bare=True)
        self._shared: mmap.mmap | None = None
        self._buffers: list[ChunkBuffer] = []
        self._free: list[int] = []
        self._pending = 0  # chunks submitted, not yet written
        self._error: BaseException | None = None

    def begin(
        self,
        store_path: Any,
        dims: Mapping[str, int],
        dtype: str,
        f32: set[str],
        chunk_rows: int,
        shapes: Mapping[str, tuple[int, ...]] | None = None,
    ) -> None:
        """Write chunks of the store at `store_path`, whose features are `dims` (in order);
        `shapes`: the row shape of each token array (its `dims` width flattened)."""
        self.settle()
        width = sum(dims.values())
        size = SLOTS * _stride(chunk_rows, width)
        fd = shared_memory(size, "probekit-chunks")
        try:
            self._shared = mmap.mmap(fd, size)
            self._send(
                Begin(
                    str(store_path), dict(dims), dtype, sorted(f32), chunk_rows, dict(shapes or {})
                )
            )
            try:
                send_handle(self._conn, fd, self._proc.pid)
            except OSError:
                self._died()
        finally:
            os.close(fd)
        while self._reply(block=True) != "begun":  # the store opened there, or why not
            pass
        self._raise()
        self._buffers = _buffers(self._shared, chunk_rows, width)
        self._free = list(range(SLOTS))

    def acquire(self) -> ChunkBuffer:
        """A free chunk buffer; waits for the writer to finish a chunk when none is free.

        Raises the error of a chunk that failed (or of opening the store) once it is known.
        """
        while self._reply(block=not self._free):  # replies already there are taken too
            pass
        self._raise()
        return self._buffers[self._free.pop()]

    def submit(
        self,
        buf: ChunkBuffer,
        split: str,
        chunk: int,
        rows: int,
        labels: np.ndarray,
        ids: Sequence[str],
        reasons: Mapping[int, str],
    ) -> None:
        """Hand rows [0, rows) of `buf` to the writer: chunk `chunk` of `split`.

        `reasons`: why an invalid row could not be read, by row within the chunk.
        """
        self._send(Chunk(buf.slot, split, chunk, rows, labels, list(ids), dict(reasons)))
        self._pending += 1

    def wait(self) -> None:
        """Return when every chunk submitted is written; raise the first error of one."""
        while self._pending:
            self._reply(block=True)
        self._raise()

    def settle(self) -> None:
        """Wait for every chunk submitted to be written or to fail, and forget the errors: after
        a failed pass, before the store is changed (no write of that pass lands after this)."""
        try:
            while self._pending:
                self._reply(block=True)
        except StoreError:  # the writer is gone: nothing of it lands any more
            pass
        self._error = None

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _send(self, msg: Begin | Chunk | End) -> None:
        try:
            self._conn.send(msg)
        except OSError:
            self._died()

    def _reply(self, block: bool) -> str:
        """Take one reply of the writer and return its kind ("" when there is none and `block`
        is False): "done" or "error" for a chunk, "begun" for `begin` (with its error if any)."""
        try:
            if not block and not self._conn.poll():
                return ""
            kind, slot, error = Reply(*self._conn.recv())
        except (EOFError, OSError):
            self._died()
        if slot is not None:  # a chunk written, or failed: its buffer is free again
            self._pending -= 1
            self._free.append(slot)
        if error is not None and self._error is None:
            self._error = error
        return str(kind)

    def _died(self) -> NoReturn:
        self._pending = 0
        code = exit_code(self._proc)
        raise StoreError(
            f"the chunk writer process ended unexpectedly (exit code {code}); chunks written "
            "before it stay done: rerun the same command to resume."
        )

    def idle(self) -> bool:
        """Alive, with no chunk pending and no error held: ready for another call."""
        return self._proc.poll() is None and not self._pending and self._error is None

    def release(self) -> None:
        """Nothing to drop between calls (the next `begin` maps new buffers)."""

    def close(self) -> None:
        """Let the writer finish the chunks it was sent, then end it (and wait for that)."""
        if self._proc.poll() is None:
            try:
                self._conn.send(End())
                while Reply(*self._conn.recv()).kind != "ended":
                    pass
            except (EOFError, OSError):
                pass
        self._proc.wait()
        self._conn.close()
        self._buffers, self._free = [], []

    def __enter__(self) -> ChunkWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- the child


class _Writer:
    """The writer process's state: the store open for writing, the shared chunk buffers."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self.store: Any = None
        self.buffers: list[ChunkBuffer] = []
        self.begun = Begin("", {}, "float16", [], 0, {})

    def handle(self, msg: Begin | Chunk | End) -> bool:
        if isinstance(msg, End):
            self.conn.send(Reply("ended", None, None))
            return False
        if isinstance(msg, Begin):
            self.begin(msg)
        else:
            self.write(msg)
        return True

    def begin(self, msg: Begin) -> None:
        from probekit.cache.store import open_store

        self.begun = msg
        fd = recv_handle(self.conn)
        width = sum(msg.dims.values())
        shared = mmap.mmap(fd, SLOTS * _stride(msg.chunk_rows, width))
        os.close(fd)
        self.buffers = _buffers(shared, msg.chunk_rows, width)
        self.store, error = None, None
        try:
            self.store = open_store(msg.path, allow_partial=True, check=False)
        except Exception as e:
            error = picklable(e)
        self.conn.send(Reply("begun", None, error))

    def write(self, msg: Chunk) -> None:
        b = self.begun
        try:
            if self.store is None:
                raise StoreError("the chunk writer has no store open")
            buf = self.buffers[msg.slot]
            why = np.full(msg.rows, "", dtype=object)
            for r, text in msg.reasons.items():
                why[r] = text
            columns = chunk_columns(
                buf.features[: msg.rows], buf.valid[: msg.rows], why, b.dims, b.dtype, set(b.f32)
            )
            for name, shape in b.shapes.items():  # token rows back to (rows, T, D)
                columns[name] = columns[name].reshape(msg.rows, *shape)
            columns["labels"] = np.asarray(msg.labels)
            columns["ids"] = np.array(msg.ids, dtype=str)
            self.store.write_chunk(msg.split, msg.chunk, b.chunk_rows, columns)
            self.conn.send(Reply("done", msg.slot, None))
        except Exception as e:
            self.conn.send(Reply("error", msg.slot, picklable(e)))


def main() -> None:
    run_child(lambda conn, parent: serve(conn, parent, _Writer(conn).handle))
