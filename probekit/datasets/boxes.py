"""Object boxes of a detection dataset: one split's boxes as flat rows with per-image offsets
(`Boxes`), built from what a layout's reader found per image (`ImageBoxes`), every
annotation checked once: a box outside its image, of zero area or of an unknown class, and
an image that is missing, make the image's row invalid with the reason.

Coordinates are pixels of the image as it is loaded (x0, y0, x1, y1; x1 and y1 exclusive, so
a box's width is x1 - x0), or with `normalized` fractions of its width and height (YOLO's
layout: the image's size is read when the boxes go through a model's geometry).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["CROWD", "DIFFICULT", "SLACK", "Boxes", "ImageBoxes", "build_boxes"]

CROWD, DIFFICULT = 1, 2  # a box's flag: COCO's iscrowd, VOC's difficult (0: neither)
SLACK = 1.0  # pixels a box may reach past its image's edge (annotation rounding) before it
# counts as outside; within it, a box is clipped to the image


@dataclass
class ImageBoxes:
    """What a reader found for one image: its boxes as (class index or None, class name, x0,
    y0, x1, y1, flag, area or None), the image's size as annotated ((w, h) or None), and why
    the image itself cannot be used (None: it can)."""

    boxes: list[tuple[int | None, str, float, float, float, float, int, float | None]] = field(
        default_factory=list
    )
    size: tuple[int, int] | None = None
    missing: str | None = None


@dataclass(frozen=True)
class Boxes:
    """One split's boxes: image i's are rows `offsets[i]:offsets[i + 1]`."""

    offsets: np.ndarray  # (N + 1,) int64
    classes: np.ndarray  # (M,) int64 indices into the class names
    xyxy: np.ndarray  # (M, 4) float64
    flags: np.ndarray  # (M,) uint8: CROWD, DIFFICULT or 0
    areas: np.ndarray  # (M,) float64: COCO's `area` where given, else the box's, in pixels
    sizes: np.ndarray  # (N, 2) int64: each image's (w, h) as annotated, 0 where not
    invalid: Mapping[int, str]  # row -> why its annotation cannot be used
    normalized: bool = False  # coordinates (and areas) are fractions of the image's size

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def rows(self, i: int) -> slice:
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))

    def digest(self) -> bytes:
        """Every value as bytes (a dataset's fingerprint takes them)."""
        parts = (self.offsets, self.classes, self.xyxy, self.flags, self.areas, self.sizes)
        text = "\n".join(f"{i}\t{why}" for i, why in sorted(self.invalid.items()))
        return b"".join(np.ascontiguousarray(p).tobytes() for p in parts) + text.encode()

    def labels(self) -> np.ndarray:
        """Each image's class as the class of its largest box that is neither crowd nor
        difficult (0 where it has none): what a classification probe on the store reads."""
        out = np.zeros(len(self), dtype=np.int64)
        wh = self.xyxy[:, 2:] - self.xyxy[:, :2]
        area = wh[:, 0] * wh[:, 1]
        for i in range(len(self)):
            r = self.rows(i)
            plain = np.flatnonzero(self.flags[r] == 0)
            if len(plain):
                out[i] = self.classes[r][plain[int(np.argmax(area[r][plain]))]]
        return out


def build_boxes(found: Sequence[ImageBoxes], n_classes: int, normalized: bool = False) -> Boxes:
    """`Boxes` of a split from each image's `ImageBoxes`, checked: the first annotation that
    cannot be used names its image's reason (a box of an unknown class, of zero area, or
    outside the image by more than SLACK pixels); boxes within SLACK are clipped."""
    offsets = [0]
    classes: list[int] = []
    xyxy: list[tuple[float, float, float, float]] = []
    flags: list[int] = []
    areas: list[float] = []
    sizes = np.zeros((len(found), 2), dtype=np.int64)
    invalid: dict[int, str] = {}
    slack = 1e-3 if normalized else SLACK
    for i, image in enumerate(found):
        w, h = image.size or (0, 0)
        if normalized:
            w, h = 1, 1
        sizes[i] = image.size or (0, 0)
        why = image.missing
        for j, (c, name, x0, y0, x1, y1, flag, area) in enumerate(image.boxes):
            if why is not None:
                break
            coords = np.array([x0, y0, x1, y1], dtype=np.float64)
            if c is None or not 0 <= c < n_classes:
                why = f"box {j} has class {name!r}, not one of the {n_classes} classes"
            elif not np.isfinite(coords).all() or x1 <= x0 or y1 <= y0:
                why = f"box {j} ({_text(coords)}) has zero area"
            elif w and h and (x0 < -slack or y0 < -slack or x1 > w + slack or y1 > h + slack):
                where = "the image" if normalized else f"the {w}x{h} image"
                why = f"box {j} ({_text(coords)}) lies outside {where}"
            else:
                if w and h:
                    coords = np.clip(coords, 0, [w, h, w, h])
                classes.append(int(c))
                xyxy.append((coords[0], coords[1], coords[2], coords[3]))
                flags.append(int(flag))
                box_area = float((coords[2] - coords[0]) * (coords[3] - coords[1]))
                areas.append(box_area if area is None or area <= 0 else float(area))
        if why is not None:
            invalid[i] = why
            # the image's boxes are kept out: its row is invalid, never trained on or scored
            del classes[offsets[-1] :], xyxy[offsets[-1] :], flags[offsets[-1] :]
            del areas[offsets[-1] :]
        offsets.append(len(classes))
    return Boxes(
        np.asarray(offsets, dtype=np.int64),
        np.asarray(classes, dtype=np.int64),
        np.asarray(xyxy, dtype=np.float64).reshape(-1, 4),
        np.asarray(flags, dtype=np.uint8),
        np.asarray(areas, dtype=np.float64),
        sizes,
        invalid,
        normalized,
    )


def _text(coords: np.ndarray) -> str:
    return ", ".join(f"{v:g}" for v in coords)
