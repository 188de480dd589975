"""Pixel batches read by a child process into shared memory, off the extraction loop's interpreter.

Reading a batch from the pixel cache is a few file reads, but Python runs around each one:
reader threads in the process that feeds a GPU take the GIL from the thread that launches the
device's work each time a read returns. Here a child process (with threads of its own) reads
each batch's rows from the chunk files into one of its batch buffers in shared memory and sends
a short message; the loop takes the buffer as a uint8 tensor (page-locked for CUDA, so the copy
to the device is asynchronous) and lends it back `hold` batches later, when the device is done
with it.

    with PixelReader() as reader:
        for images, valid, reasons in reader.read(source, batches, threads=8, hold=4, pin=True):
            ...  # images (B, 3, H, W) uint8 in channels-last memory, valid (B,), reasons [B]
"""

from __future__ import annotations

import contextlib
import inspect
import mmap
import os
import threading
from collections.abc import Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle
from typing import Any, NamedTuple, NoReturn, Protocol

import numpy as np

from probekit.cache._files import read_rows
from probekit.cache.child import End, exit_code, run_child, serve, shared_memory, start_child
from probekit.errors import StoreError

__all__ = ["PixelReader", "PixelSpec", "read_rows"]


class Read(NamedTuple):
    """Read batches `ranges` (rows [lo, hi) each) of one split into `slots` buffers of
    `slot_bytes` (the shared memory's handle follows), by `threads` threads."""

    path: str
    split: str
    chunk_rows: int
    row_bytes: int
    slot_bytes: int
    slots: int
    threads: int
    ranges: list[tuple[int, int]]


class Free(NamedTuple):
    """Buffer `slot` may be read into again."""

    slot: int


class Stop(NamedTuple):
    """End the current read (reads in flight finish; their buffers are not used)."""


class Ready(NamedTuple):
    """Batch `batch` is in buffer `slot` (or could not be read: `error`)."""

    batch: int
    slot: int
    error: str | None


READ_OVER = Ready(-1, -1, None)  # the read's last answer: none of it follows


class PixelSpec(Protocol):
    """What a read needs of one split of a pixel store (`cache.pixels.PixelSource` is one)."""

    path: Any
    split: str
    rows: int  # rows per chunk
    shape: tuple[int, ...]  # (H, W, 3)
    raw: bool  # plain uncompressed chunk files on a local disk
    valid: np.ndarray

    def reasons(self, indices: Sequence[int]) -> list[str]: ...


_PAGE = 4096
MAX_BYTES = 2 << 30  # the batch buffers' memory, unless `hold` + 2 buffers need more


class PixelReader:
    """The loop's side: starts the reader process (early: it imports while the model is built),
    then `read` streams one split's batches from a pixel store through it."""

    def __init__(self) -> None:
        # NumPy and the standard library only: it is reading by the time the model is built
        self._proc, self._conn = start_child("probekit.cache.reader", bare=True)
        self._shared: mmap.mmap | None = None
        self._fd = -1
        self._memory: Any = None  # the shared memory as one uint8 tensor
        self._pin = self._pinned = False  # asked for, done
        self._active: Generator[Any, None, None] | None = None

    def read(
        self,
        source: PixelSpec,
        batches: Sequence[Sequence[int]],
        *,
        threads: int,
        hold: int,
        pin: bool,
    ) -> Generator[tuple[Any, Any, list[str]], None, None]:
        """Batches (each a run of consecutive rows) of one split of a pixel store.

        A batch's buffer is read into again once `hold` later batches were taken: the caller
        must be done with it by then. `pin`: page-lock the buffers for CUDA copies.
        """
        assert hold >= 1 and threads >= 1, (hold, threads)
        if self._active is not None:
            self._active.close()  # an abandoned read ends before the next one starts
        self._active = self._read(source, batches, threads, hold, pin)
        return self._active

    def _read(
        self,
        source: PixelSpec,
        batches: Sequence[Sequence[int]],
        threads: int,
        hold: int,
        pin: bool,
    ) -> Generator[tuple[Any, Any, list[str]], None, None]:
        import torch

        path, split = source.path, source.split  # validity and reasons stay on this side
        if not source.raw:
            raise StoreError(f"pixel store {str(path)!r} is not plain chunk files on a disk.")
        shape = source.shape  # (H, W, 3)
        row_bytes = int(np.prod(shape))
        ranges = [(int(b[0]), int(b[-1]) + 1) for b in batches]
        if any(hi - lo != len(b) for (lo, hi), b in zip(ranges, batches, strict=True)):
            raise AssertionError("pixel batches must be runs of consecutive rows")
        slot_bytes = -(-max((len(b) for b in batches), default=1) * row_bytes // _PAGE) * _PAGE
        # `hold` buffers the loop holds, and read-ahead for every thread (fewer where buffers
        # are big: page-locked memory is the machine's, not only this process's)
        ahead = max(2, min(2 * threads, MAX_BYTES // slot_bytes - hold))
        slots = hold + ahead
        self._map(slots * slot_bytes, pin)
        self._send(
            Read(str(path), split, source.rows, row_bytes, slot_bytes, slots, threads, ranges)
        )
        try:
            send_handle(self._conn, self._fd, self._proc.pid)
        except OSError:
            self._died()
        ready: dict[int, int] = {}  # batch -> its buffer, read and not yet taken
        taken: dict[int, int] = {}  # batch -> its buffer, taken by the loop
        try:
            for j, (lo, hi) in enumerate(ranges):
                if j - hold in taken:
                    self._send(Free(taken.pop(j - hold)))
                while j not in ready:
                    batch, slot, error = self._recv()
                    if error is not None:
                        raise StoreError(
                            f"cannot read the pixel cache {str(path)!r}: {error}; delete that "
                            "directory to have it rebuilt."
                        )
                    ready[batch] = slot
                slot = ready.pop(j)
                taken[j] = slot
                at = slot * slot_bytes
                rows = self._memory[at : at + (hi - lo) * row_bytes].view(hi - lo, *shape)
                valid = torch.from_numpy(source.valid[lo:hi].copy())
                yield rows.permute(0, 3, 1, 2), valid, source.reasons(range(lo, hi))
        finally:
            self._send(Stop())
            while self._recv() != READ_OVER:  # reads in flight end; their buffers are not used
                pass

    def _map(self, size: int, pin: bool) -> None:
        """Shared memory of at least `size` bytes (kept across reads: page-locking is slow)."""
        if self._shared is not None and len(self._shared) >= size and self._pin == pin:
            return
        self._unmap()
        import torch

        self._fd = shared_memory(size, "probekit-pixels")
        self._shared = mmap.mmap(self._fd, size)
        self._memory = torch.frombuffer(self._shared, dtype=torch.uint8)
        self._pin = pin
        if pin:  # without it copies to the device are correct, only synchronous
            cudart: Any = torch.cuda.cudart()  # type: ignore[no-untyped-call]
            self._pinned = int(cudart.cudaHostRegister(self._memory.data_ptr(), size, 0)) == 0
        else:
            self._pinned = False

    def _unmap(self) -> None:
        if self._shared is None:
            return
        if self._pinned:
            import torch

            torch.cuda.synchronize()  # no copy from these pages is still queued
            cudart: Any = torch.cuda.cudart()  # type: ignore[no-untyped-call]
            cudart.cudaHostUnregister(self._memory.data_ptr())
        # tensors the loop still holds keep the mapping alive; it goes with the last of them
        self._memory, self._shared, self._pinned = None, None, False
        os.close(self._fd)
        self._fd = -1

    def _send(self, msg: Read | Free | Stop | End) -> None:
        try:
            self._conn.send(msg)
        except OSError:
            self._died()

    def _recv(self) -> Ready:
        try:
            return Ready(*self._conn.recv())
        except (EOFError, OSError):
            self._died()

    def _died(self) -> NoReturn:
        code = exit_code(self._proc)
        raise StoreError(
            f"the pixel reader process ended unexpectedly (exit code {code}); nothing was "
            "written by it: rerun the same command."
        )

    def idle(self) -> bool:
        """Alive, with no read going on: ready for another call."""
        if self._active is not None and inspect.getgeneratorstate(self._active) in (
            "GEN_SUSPENDED",
            "GEN_RUNNING",
        ):
            return False  # a read started and not ended
        return self._proc.poll() is None

    def release(self) -> None:
        """Unmap (and unlock) the batch buffers: an idle reader holds no memory."""
        self._active = None
        self._unmap()

    def close(self) -> None:
        """End the current read, then the reader process (and wait for that)."""
        with contextlib.suppress(StoreError):  # a dead reader: nothing more to end
            if self._active is not None:
                self._active.close()
        self._active = None
        if self._proc.poll() is None:
            with contextlib.suppress(OSError):
                self._conn.send(End())
        self._proc.wait()
        self._conn.close()
        self._unmap()

    def __enter__(self) -> PixelReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- the child


def _handle(conn: Connection, msg: Read | End) -> bool:
    """The reader process: one read at a time, until End."""
    if isinstance(msg, End):
        return False
    fd = recv_handle(conn)
    shared = mmap.mmap(fd, msg.slots * msg.slot_bytes)
    os.close(fd)
    memory = np.frombuffer(shared, dtype=np.uint8)
    _serve_read(conn, memory, msg)
    conn.send(READ_OVER)
    del memory, shared  # unmapped with the last reference
    return True


def _serve_read(conn: Connection, memory: np.ndarray, msg: Read) -> None:
    """Read the batches into free buffers, in order, by the message's threads; answer `Ready`
    per batch; return after `Stop` and the reads in flight."""
    path, split, chunk_rows, row_bytes, slot_bytes = (
        msg.path,
        msg.split,
        msg.chunk_rows,
        msg.row_bytes,
        msg.slot_bytes,
    )
    ranges, slots, threads = msg.ranges, msg.slots, msg.threads
    lock = threading.Lock()  # one connection, several threads answering on it

    def read(j: int, slot: int, lo: int, hi: int) -> None:
        error = None
        try:
            out = memory[slot * slot_bytes : slot * slot_bytes + (hi - lo) * row_bytes]
            read_rows(path, split, chunk_rows, lo, hi, out.reshape(hi - lo, row_bytes))
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        with lock:
            conn.send(Ready(j, slot, error))

    free = list(range(slots))[::-1]
    nxt = 0
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="probekit-read") as pool:
        while True:
            while free and nxt < len(ranges):
                pool.submit(read, nxt, free.pop(), *ranges[nxt])
                nxt += 1
            got = conn.recv()
            if isinstance(got, Free):
                free.append(got.slot)
            elif isinstance(got, Stop):
                break


def main() -> None:
    run_child(lambda conn, parent: serve(conn, parent, lambda msg: _handle(conn, msg)))
