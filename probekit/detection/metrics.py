"""Detection metrics: COCO's box AP through faster-coco-eval (a C++ port of pycocotools'
COCOeval; never written again here), Pascal VOC's AP at IoU 0.5 (VOC07's 11 points and the
area under the precision envelope), bootstrap intervals over test images, and CorLoc.

COCO AP averages precision over IoU 0.50:0.05:0.95 and 101 recall points, at most 100
detections an image; a crowd box is matched without penalty; small / medium / large are
ground-truth areas under 32^2, to 96^2 and above (in the pixels of the image as annotated:
probekit measures boxes at each image's own scale, see `cache.boxes`). A VOC-style
`difficult` box counts as crowd in COCO AP. A metric with no ground truth to score (no large
box in the test images) is NaN, never 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "COCO_METRICS",
    "ImageDets",
    "ImageTruth",
    "bootstrap_coco",
    "coco_metrics",
    "corloc",
    "voc_ap50",
]

# faster-coco-eval's `stats` 0-5, in order, as probekit's metric names
COCO_METRICS = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")


@dataclass(frozen=True)
class ImageTruth:
    """One image's ground truth: boxes (k, 4) xyxy, their classes (k,), which are crowd (or
    difficult: ignored, never a miss) (k,) bool, and their areas (k,) for the size buckets."""

    boxes: np.ndarray
    classes: np.ndarray
    ignored: np.ndarray
    areas: np.ndarray


@dataclass(frozen=True)
class ImageDets:
    """One image's detections: boxes (d, 4) xyxy, scores (d,), classes (d,)."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray


def _xywh(boxes: np.ndarray) -> list[list[float]]:
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    out: list[list[float]] = np.column_stack([b[:, :2], b[:, 2:] - b[:, :2]]).tolist()
    return out


class _Coco:
    """Each image's ground truth and detections as COCO annotations, made once; `evaluate`
    assembles any resample of the images (an image drawn twice is two images) without
    rebuilding them, and runs faster-coco-eval's COCOeval on it."""

    def __init__(self, truth: Sequence[ImageTruth], dets: Sequence[ImageDets], n_classes: int):
        self.n_classes = n_classes
        self.gts: list[list[dict[str, Any]]] = []
        self.dts: list[list[dict[str, Any]]] = []
        for t, d in zip(truth, dets, strict=True):
            self.gts.append(
                [
                    {"category_id": int(c) + 1, "bbox": box, "area": float(a), "iscrowd": int(i)}
                    for box, c, i, a in zip(
                        _xywh(t.boxes), t.classes, t.ignored.astype(bool), t.areas, strict=True
                    )
                ]
            )
            self.dts.append(
                [
                    # as COCO.loadRes makes a box result: its area is the box's
                    {
                        "category_id": int(c) + 1,
                        "bbox": box,
                        "score": float(sc),
                        "area": box[2] * box[3],
                        "iscrowd": 0,
                    }
                    for box, sc, c in zip(_xywh(d.boxes), d.scores, d.classes, strict=True)
                ]
            )

    def evaluate(self, images: np.ndarray) -> dict[str, float]:
        from faster_coco_eval import COCO, COCOeval_faster  # type: ignore[import-untyped]

        gts = [
            {**a, "image_id": k} for k, i in enumerate(images, start=1) for a in self.gts[int(i)]
        ]
        if all(a["iscrowd"] for a in gts):
            return dict.fromkeys(COCO_METRICS, float("nan"))
        dts = [
            {**a, "image_id": k} for k, i in enumerate(images, start=1) for a in self.dts[int(i)]
        ]
        for j, a in enumerate(gts, start=1):
            a["id"] = j
        for j, a in enumerate(dts, start=1):
            a["id"] = j
        head = {
            "images": [{"id": k} for k in range(1, len(images) + 1)],
            "categories": [{"id": c + 1, "name": str(c)} for c in range(self.n_classes)],
        }
        gt, dt = COCO(print_function=_quiet), COCO(print_function=_quiet)
        gt.dataset, dt.dataset = {**head, "annotations": gts}, {**head, "annotations": dts}
        gt.createIndex()
        dt.createIndex()
        ev = COCOeval_faster(gt, dt, iouType="bbox", print_function=_quiet)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        stats = np.asarray(ev.stats[: len(COCO_METRICS)], dtype=np.float64)
        return {
            k: (float(v) if v >= 0 else float("nan"))
            for k, v in zip(COCO_METRICS, stats, strict=True)
        }


def _quiet(*_: object, **__: object) -> None:
    return None


def coco_metrics(
    truth: Sequence[ImageTruth],
    dets: Sequence[ImageDets],
    n_classes: int,
    images: np.ndarray | None = None,
) -> dict[str, float]:
    """COCO's AP, AP50, AP75 and AP by size (`COCO_METRICS`, in [0, 1]; NaN where nothing
    can be scored) of `dets` against `truth`, over `images` (default: all)."""
    images = np.arange(len(truth)) if images is None else np.asarray(images)
    return _Coco(truth, dets, n_classes).evaluate(images)


def bootstrap_coco(
    truth: Sequence[ImageTruth],
    dets: Sequence[ImageDets],
    n_classes: int,
    n_boot: int = 200,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Each COCO metric on `n_boot` resamples of the test images (with replacement; seeded,
    so two probes scored on the same images see the same resamples: their per-resample
    differences give a paired interval)."""
    rng = np.random.default_rng(seed)
    n = len(truth)
    draws = rng.integers(0, n, size=(n_boot, n))
    out = {k: np.empty(n_boot) for k in COCO_METRICS}
    coco = _Coco(truth, dets, n_classes)
    for b, images in enumerate(draws):
        for k, v in coco.evaluate(images).items():
            out[k][b] = v
    return out


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box with each of `others` (torchvision's box_iou, on numpy)."""
    import torch
    from torchvision.ops import box_iou

    if not len(others):
        return np.zeros(0)
    a = torch.as_tensor(np.asarray(box, dtype=np.float64).reshape(1, 4))
    out: np.ndarray = box_iou(a, torch.as_tensor(np.asarray(others, dtype=np.float64)))[0].numpy()
    return out


def voc_ap50(
    truth: Sequence[ImageTruth], dets: Sequence[ImageDets], n_classes: int, eleven: bool
) -> float:
    """Pascal VOC's mean AP at IoU 0.5 over the classes with a box that is not difficult:
    detections of a class by descending score, each matched to the best-overlapping unmatched
    box of its class and image (IoU >= 0.5: a hit; on a difficult box: ignored; else a false
    positive). `eleven`: VOC07's 11-point interpolation (the mean of the best precision at
    recall >= 0, 0.1, ..., 1); else the area under the precision envelope (VOC 2010 on).
    Boxes are continuous (x1 - x0 wide), not VOC's inclusive pixels."""
    aps = []
    for c in range(n_classes):
        npos = sum(int(((t.classes == c) & ~t.ignored).sum()) for t in truth)
        if npos == 0:
            continue
        found = [
            (float(s), i, b)
            for i, d in enumerate(dets)
            for b, s, k in zip(d.boxes, d.scores, d.classes, strict=True)
            if k == c
        ]
        found.sort(key=lambda f: -f[0])
        used = [np.zeros(len(t.classes), dtype=bool) for t in truth]
        hits = []
        for _, i, b in found:
            t = truth[i]
            of_c = np.flatnonzero(t.classes == c)
            ious = _iou(b, t.boxes[of_c])
            j = int(np.argmax(ious)) if len(ious) else -1
            if j < 0 or ious[j] < 0.5:
                hits.append(0)
            elif t.ignored[of_c[j]]:
                continue  # a difficult box: neither a hit nor a false positive
            elif used[i][of_c[j]]:
                hits.append(0)
            else:
                used[i][of_c[j]] = True
                hits.append(1)
        tp = np.cumsum(hits)
        recall = tp / npos
        precision = tp / np.maximum(np.arange(1, len(hits) + 1), 1)
        aps.append(_interpolated(recall, precision, eleven))
    return float(np.mean(aps)) if aps else float("nan")


def _interpolated(recall: np.ndarray, precision: np.ndarray, eleven: bool) -> float:
    if eleven:
        return float(
            np.mean(
                [
                    precision[recall >= t].max() if (recall >= t).any() else 0.0
                    for t in np.linspace(0, 1, 11)
                ]
            )
        )
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[0.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]  # the envelope: best precision at recall >= r
    step = np.flatnonzero(r[1:] != r[:-1])
    return float(np.sum((r[step + 1] - r[step]) * p[step + 1]))


def corloc(truth: Sequence[ImageTruth], boxes: np.ndarray) -> tuple[float, np.ndarray]:
    """CorLoc: the fraction of images whose one predicted box (`boxes` (n, 4)) has IoU >= 0.5
    with some ground-truth box of the image, and each image's hit (n,) bool."""
    hits = np.array(
        [bool((_iou(b, t.boxes) >= 0.5).any()) for b, t in zip(boxes, truth, strict=True)]
    )
    return (float(hits.mean()) if len(hits) else float("nan")), hits
