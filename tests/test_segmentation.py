"""Dense metrics against an independent numpy computation (a confusion matrix built pixel by
pixel in Python), with the ignore label and classes absent from truth and prediction; the
mask geometry against the image's."""

from __future__ import annotations

import numpy as np
import pytest

from probekit.segmentation import (
    IGNORE,
    bootstrap_dense,
    confusion,
    image_confusions,
    mean_iou,
    pixel_accuracy,
)


def _reference(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> tuple[float, float]:
    """Class by class, pixel by pixel: IoU of each class present anywhere, their mean."""
    right = total = 0
    inter = [0] * n_classes
    union = [0] * n_classes
    for p, t in zip(pred.ravel().tolist(), truth.ravel().tolist(), strict=True):
        if t == IGNORE:
            continue
        total += 1
        right += p == t
        for c in range(n_classes):
            inter[c] += p == c and t == c
            union[c] += p == c or t == c
    ious = [i / u for i, u in zip(inter, union, strict=True) if u > 0]
    return sum(ious) / len(ious), right / total


def test_miou_and_pixel_accuracy_equal_a_pixel_by_pixel_reference() -> None:
    rng = np.random.default_rng(0)
    n_classes = 6  # class 5 never appears in truth or prediction: skipped, not counted as 0
    truth = rng.integers(0, 5, size=(4, 20, 20))
    truth[rng.random(truth.shape) < 0.1] = IGNORE
    pred = np.where(rng.random(truth.shape) < 0.7, truth, rng.integers(0, 5, truth.shape))
    pred[pred == IGNORE] = 0  # a prediction is a class
    cm = confusion(pred, truth, n_classes)
    want_miou, want_acc = _reference(pred, truth, n_classes)
    assert mean_iou(cm) == pytest.approx(want_miou, rel=1e-12)
    assert pixel_accuracy(cm) == pytest.approx(want_acc, rel=1e-12)
    assert cm.sum() == int((truth != IGNORE).sum())
    # a class only predicted (never true) counts, with IoU 0
    pred2 = pred.copy()
    pred2[0, 0, 0] = 5
    truth2 = truth.copy()
    truth2[0, 0, 0] = 0
    assert mean_iou(confusion(pred2, truth2, n_classes)) == pytest.approx(
        _reference(pred2, truth2, n_classes)[0]
    )
    per = image_confusions(pred, truth, n_classes)
    assert np.array_equal(per.sum(0), cm)
    ci = bootstrap_dense(per, n_boot=200)
    assert ci["miou"][0] <= mean_iou(cm) <= ci["miou"][1]
    with pytest.raises(ValueError, match="mask labels"):
        confusion(pred, np.full_like(truth, 7), n_classes)


@pytest.mark.parametrize(
    "config",
    [
        {"input_size": (3, 64, 64), "interpolation": "bicubic", "crop_pct": 0.875},
        {"input_size": (3, 48, 48), "interpolation": "bilinear", "crop_pct": 1.0},
        {"input_size": (3, 32, 32), "interpolation": "bicubic", "crop_pct": 0.5},
    ],
)
def test_a_mask_takes_exactly_the_image_crop_and_resize(config: dict) -> None:
    """A mask drawn from the image itself (its labels are the image's grey levels): the mask's
    geometry gives exactly what the image's geometry gives with nearest interpolation."""
    from PIL import Image

    from probekit.extraction.preprocess import geometry_transform

    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 12, size=(9, 13)).astype(np.uint8)
    labels = np.kron(blocks, np.ones((11, 7), np.uint8))[:97, :83]  # 97 x 83, not square
    image = Image.fromarray(np.repeat(labels[..., None] * 20, 3, axis=2))
    mask = Image.fromarray(labels)
    got = np.asarray(geometry_transform(config).mask(mask))
    nearest = geometry_transform({**config, "interpolation": "nearest"})
    want = np.asarray(nearest(image))[..., 0] // 20
    assert got.shape == want.shape == config["input_size"][1:]
    np.testing.assert_array_equal(got, want)
    # and where the image geometry interpolates, the mask still holds only labels it had
    assert set(np.unique(got)) <= set(np.unique(labels))


def test_digit_scenes_are_deterministic_with_masks_that_match_the_strokes() -> None:
    from probekit.data import load_dataset

    a, b = load_dataset("digit-scenes:24"), load_dataset("digit-scenes:24")
    assert a.dense and a.fingerprint == b.fingerprint
    assert a.class_names == ("background", *[str(d) for d in range(10)])
    assert {k: len(v) for k, v in a.splits.items()} == {"train": 18, "test": 6}
    assert a.masks is not None and b.masks is not None
    for split in ("train", "test"):
        assert np.array_equal(a.masks[split], b.masks[split])
        images = a.arrays[split] if a.arrays is not None else None
        assert images is not None and images.shape[:3] == a.masks[split].shape
        m = a.masks[split]
        assert m.max() <= 10 and (m > 0).any()
        # digit pixels are painted in a bright colour (180-255 a channel, blended by stroke)
        assert images[m > 0].min(axis=1).mean() > 150
        # the image's label is 1 + its most common digit
        for i, lab in enumerate(a.splits[split].labels):
            counts = np.bincount(m[i].ravel(), minlength=11)[1:]
            assert lab == counts.argmax() + 1
    mask = a.load_mask("train", 0)
    assert mask.mode == "L" and np.array_equal(np.asarray(mask), a.masks["train"][0])
    assert load_dataset("digit-scenes:32").fingerprint != a.fingerprint
