"""Detection metrics against independent references: COCO AP against pycocotools on random,
perfect and hand-worked predictions (crowd boxes included); VOC AP50 on hand-worked cases
(difficult boxes included); CorLoc by hand."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest

from probekit.detection.metrics import (
    COCO_METRICS,
    ImageDets,
    ImageTruth,
    bootstrap_coco,
    coco_metrics,
    corloc,
    voc_ap50,
)


def _truth(boxes, classes, ignored=None, areas=None) -> ImageTruth:  # type: ignore[no-untyped-def]
    b = np.asarray(boxes, float).reshape(-1, 4)
    wh = b[:, 2:] - b[:, :2]
    return ImageTruth(
        b,
        np.asarray(classes, int),
        np.zeros(len(b), bool) if ignored is None else np.asarray(ignored, bool),
        wh[:, 0] * wh[:, 1] if areas is None else np.asarray(areas, float),
    )


def _dets(boxes, scores, classes) -> ImageDets:  # type: ignore[no-untyped-def]
    return ImageDets(
        np.asarray(boxes, float).reshape(-1, 4), np.asarray(scores, float), np.asarray(classes)
    )


def _random_case(seed: int, n_images: int = 12, n_classes: int = 3):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    truth, dets = [], []
    for _ in range(n_images):
        k = int(rng.integers(0, 6))
        xy = rng.uniform(0, 300, (k, 2))
        wh = rng.uniform(4, 150, (k, 2))
        boxes = np.column_stack([xy, xy + wh])
        crowd = rng.random(k) < 0.15
        truth.append(_truth(boxes, rng.integers(0, n_classes, k), crowd))
        d = int(rng.integers(0, 12))
        # some near the truth (jittered), some anywhere
        near = boxes[rng.integers(0, k, d)] + rng.normal(0, 8, (d, 4)) if k else np.zeros((0, 4))
        far_xy = rng.uniform(0, 300, (d, 2))
        far = np.column_stack([far_xy, far_xy + rng.uniform(4, 150, (d, 2))])
        pick = rng.random(d) < 0.6
        db = np.where(pick[:, None] & (k > 0), near if k else far, far)
        db[:, 2:] = np.maximum(db[:, 2:], db[:, :2] + 1)
        dets.append(_dets(db, rng.random(d), rng.integers(0, n_classes, d)))
    return truth, dets, n_classes


def _pycocotools(truth, dets, n_classes) -> np.ndarray:  # type: ignore[no-untyped-def]
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    anns, found = [], []
    for i, (t, d) in enumerate(zip(truth, dets, strict=True), start=1):
        for b, c, ign, a in zip(t.boxes, t.classes, t.ignored, t.areas, strict=True):
            box = [b[0], b[1], b[2] - b[0], b[3] - b[1]]
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": int(c) + 1,
                    "bbox": box,
                    "area": float(a),
                    "iscrowd": int(ign),
                }
            )
        for b, s, c in zip(d.boxes, d.scores, d.classes, strict=True):
            box = [b[0], b[1], b[2] - b[0], b[3] - b[1]]
            found.append({"image_id": i, "category_id": int(c) + 1, "bbox": box, "score": s})
    gt = COCO()
    gt.dataset = {
        "images": [{"id": i} for i in range(1, len(truth) + 1)],
        "annotations": anns,
        "categories": [{"id": c + 1} for c in range(n_classes)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(found), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats[:6])


@pytest.mark.parametrize("seed", range(6))
def test_coco_ap_equals_pycocotools_on_random_predictions(seed: int) -> None:
    truth, dets, n_classes = _random_case(seed)
    ours = coco_metrics(truth, dets, n_classes)
    ref = _pycocotools(truth, dets, n_classes)
    for k, want in zip(COCO_METRICS, ref, strict=True):
        if want < 0:
            assert np.isnan(ours[k]), k
        else:
            assert ours[k] == pytest.approx(want, abs=1e-9), (k, ours[k], want)


def test_perfect_predictions_score_one_and_none_zero() -> None:
    truth, _, n_classes = _random_case(0)
    perfect = [_dets(t.boxes, np.ones(len(t.boxes)), t.classes) for t in truth]
    got = coco_metrics(truth, perfect, n_classes)
    assert got["ap"] == pytest.approx(1.0) and got["ap50"] == pytest.approx(1.0)
    empty = [_dets(np.zeros((0, 4)), [], []) for _ in truth]
    assert coco_metrics(truth, empty, n_classes)["ap"] == 0.0


def test_hand_worked_coco_cases() -> None:
    """One 100x100 box. A detection of IoU 0.81 (90x90 inside it) hits at IoU thresholds
    0.50-0.80 (7 of 10) and misses above: AP = 0.7. Add the exact box at a lower score: at
    0.50-0.80 it is a false positive after the hit (precision 1 at every recall reached:
    1), at 0.85-0.95 it is the hit after a false positive (precision 1/2): AP = (7 + 3 / 2)
    / 10 = 0.85. A crowd box costs nothing: a detection on it is not a false positive."""
    t = [_truth([[0, 0, 100, 100]], [0])]
    one = [_dets([[0, 0, 90, 90]], [0.9], [0])]
    assert coco_metrics(t, one, 1)["ap"] == pytest.approx(0.7)
    assert coco_metrics(t, one, 1)["ap50"] == pytest.approx(1.0)
    assert coco_metrics(t, one, 1)["ap75"] == pytest.approx(1.0)
    two = [_dets([[0, 0, 90, 90], [0, 0, 100, 100]], [0.9, 0.5], [0, 0])]
    assert coco_metrics(t, two, 1)["ap"] == pytest.approx(0.85)
    crowd = [_truth([[0, 0, 100, 100], [200, 200, 300, 300]], [0, 0], [False, True])]
    on_crowd = [_dets([[0, 0, 100, 100], [210, 210, 290, 290]], [0.5, 0.9], [0, 0])]
    assert coco_metrics(crowd, on_crowd, 1)["ap"] == pytest.approx(1.0)
    # sizes: a 20x20 box is small; with no medium or large box those are NaN
    small = [_truth([[0, 0, 20, 20]], [0])]
    got = coco_metrics(small, [_dets([[0, 0, 20, 20]], [1.0], [0])], 1)
    assert got["ap_small"] == pytest.approx(1.0) and np.isnan(got["ap_large"])


def test_bootstrap_resamples_images_and_pairs_by_seed() -> None:
    truth, dets, n_classes = _random_case(3, n_images=10)
    a = bootstrap_coco(truth, dets, n_classes, n_boot=20, seed=5)
    b = bootstrap_coco(truth, dets, n_classes, n_boot=20, seed=5)
    np.testing.assert_array_equal(a["ap"], b["ap"])
    draws = np.random.default_rng(5).integers(0, 10, size=(20, 10))
    assert a["ap50"][7] == pytest.approx(coco_metrics(truth, dets, n_classes, draws[7])["ap50"])
    assert a["ap"].std() > 0


def test_voc_ap50_hand_worked_with_difficult_boxes() -> None:
    """Two images, class 0: three boxes, one difficult. Detections by score: a hit, a
    detection on the difficult box (ignored), a false positive, a hit. Recall 1/2, then 2/2;
    precision 1, then 1/2, then 2/3 at the second hit. VOC07: recall >= 0..0.5 (6 points) at
    precision 1, 0.6..1 (5 points) at 2/3: (6 + 5 * 2/3) / 11. Area: 0.5 * 1 + 0.5 * 2/3."""
    truth = [
        _truth([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 0], [False, True]),
        _truth([[0, 0, 10, 10]], [0]),
    ]
    dets = [
        _dets([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]], [0.9, 0.8, 0.7], [0, 0, 0]),
        _dets([[0, 0, 10, 11]], [0.6], [0]),
    ]
    assert voc_ap50(truth, dets, 1, eleven=True) == pytest.approx((6 + 5 * 2 / 3) / 11)
    assert voc_ap50(truth, dets, 1, eleven=False) == pytest.approx(0.5 + 0.5 * 2 / 3)
    # a duplicate of a hit is a false positive; a class with no box is left out of the mean
    dup = [_dets([[0, 0, 10, 10], [0, 0, 10, 10]], [0.9, 0.8], [0, 0]), _dets([], [], [])]
    assert voc_ap50(truth, dup, 3, eleven=False) == pytest.approx(0.5)


def test_corloc_by_hand() -> None:
    truth = [_truth([[0, 0, 10, 10], [20, 20, 40, 40]], [0, 1]), _truth([[0, 0, 10, 10]], [0])]
    value, hits = corloc(truth, np.array([[22, 22, 40, 40], [5, 5, 15, 15]], float))
    assert hits.tolist() == [True, False] and value == 0.5
