"""Dense metrics of a segmentation on a split: the confusion matrix over every scored pixel
(255 = ignore), mean IoU over the classes present in the truth or the prediction, pixel
accuracy, and bootstrap intervals that resample whole images (the split's pixels are not
independent; its images are)."""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "IGNORE",
    "bootstrap_dense",
    "class_counts",
    "confusion",
    "image_confusions",
    "mean_iou",
    "paired_dense_delta",
    "pixel_accuracy",
]

IGNORE = 255  # the label of pixels no metric counts (VOC's borders, unlabeled pixels)


def confusion(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> np.ndarray:
    """(C, C) int64 counts of (truth, prediction) over pixels whose truth is not IGNORE; a
    truth label outside [0, C) is an error (the mask does not match the class list)."""
    t = np.asarray(truth).ravel().astype(np.int64)
    p = np.asarray(pred).ravel().astype(np.int64)
    keep = t != IGNORE
    t, p = t[keep], p[keep]
    if len(t) and (t.min() < 0 or t.max() >= n_classes):
        raise ValueError(f"mask labels must be in [0, {n_classes}) or {IGNORE}.")
    if len(p) and (p.min() < 0 or p.max() >= n_classes):
        raise ValueError(f"predictions must be in [0, {n_classes}).")
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(
        n_classes, n_classes
    )


def image_confusions(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> np.ndarray:
    """(N, C, C): one confusion matrix per image of (N, H, W) predictions and truths."""
    return np.stack([confusion(p, t, n_classes) for p, t in zip(pred, truth, strict=True)])


def mean_iou(cm: np.ndarray) -> float:
    """Mean over classes of TP / (TP + FP + FN), skipping classes absent from both the truth
    and the prediction (their IoU is undefined); NaN where no class is present."""
    tp = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - tp
    present = union > 0
    return float((tp[present] / union[present]).mean()) if present.any() else math.nan


def pixel_accuracy(cm: np.ndarray) -> float:
    total = cm.sum()
    return float(np.trace(cm) / total) if total else math.nan


def bootstrap_dense(
    per_image: np.ndarray, n_boot: int = 1000, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """95% intervals of mIoU and pixel accuracy, resampling images: (N, C, C) confusions."""
    rng = np.random.default_rng(seed)
    n = len(per_image)
    flat = per_image.reshape(n, -1).astype(np.float64)
    c = per_image.shape[1]
    mious, accs = [], []
    for _ in range(n_boot):
        counts = np.bincount(rng.integers(0, n, n), minlength=n)
        cm = (counts @ flat).reshape(c, c)
        mious.append(mean_iou(cm))
        accs.append(pixel_accuracy(cm))
    return {
        "miou": (float(np.nanpercentile(mious, 2.5)), float(np.nanpercentile(mious, 97.5))),
        "pixel_acc": (float(np.nanpercentile(accs, 2.5)), float(np.nanpercentile(accs, 97.5))),
    }


def class_counts(per_image: np.ndarray) -> np.ndarray:
    """(N, C, 3) int64 (TP, FP, FN) of each class in each image, from (N, C, C) confusions:
    all that mIoU and pixel accuracy read (their sums give the split's)."""
    tp = np.diagonal(per_image, axis1=1, axis2=2)
    fp = per_image.sum(1) - tp
    fn = per_image.sum(2) - tp
    return np.stack([tp, fp, fn], axis=-1).astype(np.int64)


def _miou_acc(counts: np.ndarray) -> tuple[float, float]:
    """(mIoU, pixel accuracy) of summed (C, 3) class counts."""
    tp, fp, fn = counts[:, 0], counts[:, 1], counts[:, 2]
    union = tp + fp + fn
    present = union > 0
    miou = float((tp[present] / union[present]).mean()) if present.any() else math.nan
    total = (tp + fn).sum()
    return miou, float(tp.sum() / total) if total else math.nan


def paired_dense_delta(
    counts_a: np.ndarray, counts_b: np.ndarray, n_boot: int = 1000, seed: int = 0
) -> dict[str, tuple[float, float, float]]:
    """mIoU and pixel accuracy of A minus B on the same images ((N, C, 3) class counts each,
    `class_counts`), with 95% intervals resampling images (the same draw for both):
    {"miou": (delta, lo, hi), "pixel_acc": (...)}."""
    a, b = np.asarray(counts_a, np.float64), np.asarray(counts_b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired counts differ in shape: {a.shape} vs {b.shape}.")
    n = len(a)
    rng = np.random.default_rng(seed)
    flat_a, flat_b = a.reshape(n, -1), b.reshape(n, -1)
    draws = []
    for _ in range(n_boot):
        w = np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)
        ma, pa = _miou_acc((w @ flat_a).reshape(a.shape[1:]))
        mb, pb = _miou_acc((w @ flat_b).reshape(b.shape[1:]))
        draws.append((ma - mb, pa - pb))
    d = np.array(draws)
    ma, pa = _miou_acc(a.sum(0))
    mb, pb = _miou_acc(b.sum(0))
    lo, hi = np.nanpercentile(d, [2.5, 97.5], axis=0)
    return {
        "miou": (ma - mb, float(lo[0]), float(hi[0])),
        "pixel_acc": (pa - pb, float(lo[1]), float(hi[1])),
    }
