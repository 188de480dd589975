"""Segmentation masks into the store: each image's mask through the model's own resizes and
crops (nearest), written chunk by chunk just before that chunk's features, whatever path the
images take (worker processes, the pixel cache, nvJPEG): masks never travel with the pixels."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from probekit.cache.store import FeatureStore
from probekit.datasets import Dataset
from probekit.errors import InvalidImageError
from probekit.segmentation import IGNORE

__all__ = ["mask_rows", "write_masks"]


def mask_rows(
    dataset: Dataset,
    split: str,
    rows: Sequence[int],
    geometry: Callable[[Any], Any],
    size: tuple[int, int],
    pool: ThreadPoolExecutor | None = None,
) -> tuple[np.ndarray, dict[int, str]]:
    """(len(rows), H, W) uint8 masks of `rows` at the model's input `size` (H, W), and why the
    mask of a row could not be used, by its position in `rows` (its pixels are then all 255)."""
    h, w = size

    def one(i: int) -> tuple[np.ndarray | None, str]:
        try:
            mask = dataset.load_mask(split, i, dataset.image_size(split, i))
            out = np.asarray(geometry(mask), dtype=np.uint8)
        except InvalidImageError as e:
            return None, str(e)
        if out.shape != (h, w):
            return None, f"mask came out {out.shape[1]}x{out.shape[0]}, not {w}x{h}"
        return out, ""

    done = list(pool.map(one, rows)) if pool is not None else [one(i) for i in rows]
    masks = np.full((len(rows), h, w), IGNORE, dtype=np.uint8)
    reasons: dict[int, str] = {}
    for k, (mask, why) in enumerate(done):
        if mask is None:
            reasons[k] = why
        else:
            masks[k] = mask
    return masks, reasons


def write_masks(
    store: FeatureStore,
    dataset: Dataset,
    split: str,
    chunks: Sequence[int],
    geometry: Callable[[Any], Any],
    threads: int = 4,
) -> dict[int, str]:
    """Write the masks of `chunks` of `split` (not marking them done: their features do);
    returns why a row's mask could not be used, by row of the split."""
    shape = store.mask_shape
    assert shape is not None, "a store for a segmentation dataset has masks"
    chunk_rows = int(store.meta["chunk_rows"])
    n = len(dataset.splits[split])
    reasons: dict[int, str] = {}
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="probekit-masks") as pool:
        for c in chunks:
            rows = range(c * chunk_rows, min(n, (c + 1) * chunk_rows))
            masks, why = mask_rows(dataset, split, rows, geometry, shape, pool)
            store.write_chunk(split, c, chunk_rows, {"masks": masks}, mark_done=False)
            reasons.update((rows[k], r) for k, r in why.items())
    return reasons
