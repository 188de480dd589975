"""Object boxes into the store: each image's boxes through the model's own resizes and crops
(`Geometry.boxes`, torchvision's box transforms), clipped to the input; a box left with less
than half of its area inside the crop is dropped, and counted.

A split's boxes are one flat table, a row a box (see `BOX_COLUMNS`), with per-image offsets:
image i's boxes are rows offsets[i]:offsets[i + 1]. Coordinates are pixels of the model's
input; `area` stays the box's area in the original image (COCO's, where annotated), which is
what COCO's small / medium / large buckets are defined on, and each image's scale (input
pixels per image pixel) is kept, so that an evaluation can measure boxes as the image did.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from probekit.datasets import Dataset
from probekit.errors import InvalidImageError

__all__ = ["BOX_COLUMNS", "MIN_KEPT", "BoxTable", "box_tables"]

BOX_COLUMNS = ("row", "class", "x0", "y0", "x1", "y1", "flag", "area")
MIN_KEPT = 0.5  # a box with less of its area inside the crop is dropped


@dataclass(frozen=True)
class BoxTable:
    """One split's boxes at the model's input, and what happened on the way."""

    table: np.ndarray  # (M, 8) float64, columns BOX_COLUMNS
    offsets: np.ndarray  # (N + 1,) int64
    scales: np.ndarray  # (N,) float64: input pixels per image pixel (0: the image is unread)
    reasons: dict[int, str]  # row -> why its boxes cannot be used (the row is invalid)
    clipped: int  # boxes cut by the crop and kept
    dropped: int  # boxes mostly outside the crop

    def stats(self) -> dict[str, int]:
        return {"boxes": len(self.table), "clipped": self.clipped, "dropped": self.dropped}


def box_tables(
    dataset: Dataset, boxes_through: Callable[[np.ndarray, tuple[int, int]], Any]
) -> dict[str, BoxTable]:
    """Every split's `BoxTable`, each image's boxes sent through `boxes_through(xyxy, (w, h))`
    (`Geometry.boxes`), images of one size in one call."""
    assert dataset.boxes is not None, "a detection dataset has boxes"
    return {
        split: _split_table(dataset, split, boxes, boxes_through)
        for split, boxes in dataset.boxes.items()
    }


def _split_table(
    dataset: Dataset,
    split: str,
    boxes: Any,
    boxes_through: Callable[[np.ndarray, tuple[int, int]], Any],
) -> BoxTable:
    n = len(boxes)
    reasons = dict(boxes.invalid)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i in range(n):
        if i in reasons:
            continue
        try:
            size = tuple(int(v) for v in dataset.image_size(split, i))
        except InvalidImageError:
            continue  # the image's own read says why its row is invalid
        stated = tuple(int(v) for v in boxes.sizes[i])
        if any(stated) and stated != size:
            reasons[i] = (
                f"annotated for a {stated[0]}x{stated[1]} image, the image is {size[0]}x{size[1]}"
            )
            continue
        by_size.setdefault(size, []).append(i)  # type: ignore[arg-type]
    out_xyxy = np.zeros((len(boxes.classes), 4))
    kept = np.zeros(len(boxes.classes))
    done = np.zeros(len(boxes.classes), dtype=bool)
    scales = np.zeros(n)
    for (w, h), rows in by_size.items():
        idx = np.concatenate([np.arange(boxes.offsets[i], boxes.offsets[i + 1]) for i in rows])
        xyxy = boxes.xyxy[idx] * (np.array([w, h, w, h]) if boxes.normalized else 1.0)
        out_xyxy[idx], kept[idx], scales[rows] = boxes_through(xyxy, (w, h))
        done[idx] = True
    keep = done & (kept >= MIN_KEPT)
    clipped = int((keep & (kept < 1 - 1e-4)).sum())  # float32 box transforms: not exact
    dropped = int((done & ~keep).sum())
    image_of = np.repeat(np.arange(n), np.diff(boxes.offsets))
    areas = boxes.areas.copy()
    if boxes.normalized:  # fractions of the image: its pixels, per image
        for (w, h), rows in by_size.items():
            for i in rows:
                areas[boxes.offsets[i] : boxes.offsets[i + 1]] *= w * h
    table = np.column_stack(
        [image_of, boxes.classes, out_xyxy, boxes.flags.astype(np.float64), areas]
    )[keep]
    offsets = np.zeros(n + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(np.bincount(image_of[keep], minlength=n))
    return BoxTable(table.astype(np.float64), offsets, scales, reasons, clipped, dropped)
