"""A detection store's boxes: per split a flat table `<split>/boxes` (M, 8) float64, a row a
box (image row, class, x0, y0, x1, y1 in the model's input pixels, flag, area in the original
image's pixels; `extraction.boxes.BOX_COLUMNS`), `<split>/box_offsets` (N + 1,) int64: image
i's boxes are rows offsets[i]:offsets[i + 1], and `<split>/box_scale` (N,) float64: each
image's resize (input pixels per image pixel; 0 where the image could not be read).

They depend on the dataset and the model's geometry alone, so they are written whole when the
store is made (and again by an extraction that resumes it, where a repair made them anew),
with their crc32s in the store's metadata (`box_crc`) for `verify`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from probekit.cache._chunked import BOX_CHUNK, COMPRESSOR, values_crc
from probekit.errors import StoreError

__all__ = ["box_problem", "read_boxes", "write_box_arrays"]


def write_box_arrays(
    group: Any, split: str, table: np.ndarray, offsets: np.ndarray, scales: np.ndarray
) -> list[int]:
    """Make (anew) and fill one split's box arrays; their crc32s."""
    m = len(table)
    values = {
        "boxes": np.ascontiguousarray(table, dtype=np.float64).reshape(m, 8),
        "box_offsets": np.ascontiguousarray(offsets, dtype=np.int64),
        "box_scale": np.ascontiguousarray(scales, dtype=np.float64),
    }
    rows = {"boxes": max(1, min(m, BOX_CHUNK))}
    for name, v in values.items():
        arr = group.create_array(
            f"{split}/{name}",
            shape=v.shape,
            chunks=(rows.get(name, max(1, len(v))), *v.shape[1:]),
            dtype=str(v.dtype),
            compressors=COMPRESSOR,
            fill_value=0,
            overwrite=True,
            # every chunk a file, zeros too: a missing one is damage
            config={"write_empty_chunks": True},
        )
        if len(v):
            arr[:] = v
    return [values_crc(v) for v in values.values()]


def box_problem(
    table: np.ndarray,
    offsets: np.ndarray,
    scales: np.ndarray,
    n_rows: int,
    num_classes: int | None,
) -> str | None:
    """What makes a split's box arrays other than the store writes them (None: nothing)."""
    m = len(table)
    if len(scales) != n_rows or not np.isfinite(scales).all() or (scales < 0).any():
        return "image scales that are not sizes"
    if len(offsets) != n_rows + 1 or offsets[0] != 0 or offsets[-1] != m:
        return "box offsets that do not index the table"
    if (np.diff(offsets) < 0).any():
        return "box offsets that decrease"
    if not np.isfinite(table).all():
        return "boxes that are not finite"
    if m == 0:
        return None
    rows = np.repeat(np.arange(n_rows), np.diff(offsets))
    if not np.array_equal(table[:, 0], rows):
        return "boxes whose image rows disagree with the offsets"
    classes = table[:, 1]
    if (classes < 0).any() or (num_classes is not None and (classes >= num_classes).any()):
        return "box classes beyond the classes"
    if (table[:, 4] <= table[:, 2]).any() or (table[:, 5] <= table[:, 3]).any():
        return "boxes of zero area"
    return None


def read_boxes(
    group: Any, split: str, n_rows: int, num_classes: int, where: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(table (M, 8), offsets (N + 1,), scales (N,)) of a split, checked (a one-line
    StoreError naming the store and what is wrong)."""
    try:
        table = np.asarray(group[f"{split}/boxes"][:], dtype=np.float64).reshape(-1, 8)
        offsets = np.asarray(group[f"{split}/box_offsets"][:], dtype=np.int64)
        scales = np.asarray(group[f"{split}/box_scale"][:], dtype=np.float64)
    except KeyError:
        raise StoreError(
            f"store {where} has no boxes for {split}: it was not extracted from a detection "
            "dataset (det:PATH or digit-boxes)."
        ) from None
    except Exception as e:
        raise StoreError(
            f"store {where} is damaged: {split}/boxes fail to decode ({type(e).__name__}); "
            f"run `probekit verify --repair {where}`."
        ) from None
    problem = box_problem(table, offsets, scales, n_rows, num_classes)
    if problem is not None:
        raise StoreError(
            f"store {where} is damaged: {split}/boxes hold {problem}; run `probekit verify "
            f"--repair {where}`."
        )
    return table, offsets, scales
