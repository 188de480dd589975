"""Pixel rows read straight from a plain local pixel store's chunk files (NumPy and the
standard library only: the reader process imports this and nothing heavier)."""

from __future__ import annotations

import os

import numpy as np

__all__ = ["read_rows"]


def read_rows(path: str, split: str, chunk_rows: int, lo: int, hi: int, out: np.ndarray) -> None:
    """Rows [lo, hi) of a plain local pixel store straight from its chunk files into `out`
    ((hi - lo, bytes per row) uint8): one read per chunk, with the GIL released."""
    row_bytes = out.shape[1]
    r = lo
    while r < hi:
        chunk = r // chunk_rows
        stop = min(hi, (chunk + 1) * chunk_rows)
        name = os.path.join(path, split, "pixels", "c", str(chunk), "0", "0", "0")
        view = memoryview(out[r - lo : stop - lo]).cast("B")  # type: ignore[arg-type]
        try:
            with open(name, "rb", buffering=0) as fh:
                fh.seek((r - chunk * chunk_rows) * row_bytes)
                at = 0
                while at < view.nbytes:
                    got = fh.readinto(view[at:])
                    if not got:
                        raise OSError(f"{name} is shorter than its rows (truncated?)")
                    at += got
        except FileNotFoundError:  # a chunk Zarr never wrote: all fill value
            out[r - lo : stop - lo] = 0
        r = stop
