"""Dense metrics against an independent numpy computation (a confusion matrix built pixel by
pixel in Python), with the ignore label and classes absent from truth and prediction; the
mask geometry against the image's."""

from __future__ import annotations

from pathlib import Path

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
    from probekit.datasets import load_dataset

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


def _palette_png(path: Path, labels: np.ndarray) -> None:
    """A VOC-style mask: a palette PNG whose indices are the labels."""
    from PIL import Image

    im = Image.fromarray(labels.astype(np.uint8), mode="P")
    palette = np.random.default_rng(0).integers(0, 256, 768).astype(np.uint8)
    im.putpalette(palette.tolist())
    im.save(path)


def _voc(root: Path) -> dict[str, np.ndarray]:
    from PIL import Image

    rng = np.random.default_rng(2)
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    truth = {}
    for i in range(5):
        stem = f"2007_{i:06d}"
        h, w = 30 + i, 40
        Image.fromarray(rng.integers(0, 256, (h, w, 3)).astype(np.uint8)).save(
            root / "JPEGImages" / f"{stem}.jpg"
        )
        labels = rng.integers(0, 21, (h, w))
        labels[0, :] = 255  # an ignored border
        _palette_png(root / "SegmentationClass" / f"{stem}.png", labels)
        truth[stem] = labels
    sets = root / "ImageSets" / "Segmentation"
    (sets / "train.txt").write_text("2007_000000\n2007_000001\n2007_000002\n")
    (sets / "val.txt").write_text("2007_000003\n2007_000004\n")
    return truth


def test_voc_layout_reads_palette_indices_with_ignore(tmp_path: Path) -> None:
    from probekit.datasets import load_dataset
    from probekit.datasets.seg import VOC_CLASSES
    from probekit.errors import DatasetError, InvalidImageError

    truth = _voc(tmp_path / "voc")
    ds = load_dataset(f"seg:{tmp_path / 'voc'}")
    assert ds.dense and ds.class_names == VOC_CLASSES
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 3, "test": 2}  # val -> test
    for split in ("train", "test"):
        for i, path in enumerate(ds.splits[split].ids):
            stem = Path(path).stem
            image = ds.load_image(split, i)
            mask = ds.load_mask(split, i, size=image.size)
            assert np.array_equal(np.asarray(mask), truth[stem])  # indices; 255 kept
    # a label beyond the 21 classes, a mask of another size: the row's reason
    _palette_png(tmp_path / "voc/SegmentationClass/2007_000000.png", np.full((30, 40), 30))
    with pytest.raises(InvalidImageError, match="label 30, beyond the 21 classes"):
        ds.load_mask("train", 0)
    with pytest.raises(InvalidImageError, match="the image 41x30"):
        ds.load_mask("train", 0, size=(41, 30))
    (tmp_path / "voc/SegmentationClass/2007_000004.png").unlink()
    with pytest.raises(DatasetError, match=r"val.txt line 2 names '2007_000004'.*mask is missing"):
        load_dataset(f"seg:{tmp_path / 'voc'}")


def test_ade_and_plain_layouts(tmp_path: Path) -> None:
    from PIL import Image

    from probekit.datasets import load_dataset
    from probekit.errors import DatasetError

    ade = tmp_path / "ade"
    for part in ("training", "validation"):
        (ade / "images" / part).mkdir(parents=True)
        (ade / "annotations" / part).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 6)).save(ade / "images" / part / f"ADE_{i}.jpg")
            labels = np.arange(48).reshape(6, 8) % 4  # 0 = other: ignored
            Image.fromarray(labels.astype(np.uint8), mode="L").save(
                ade / "annotations" / part / f"ADE_{i}.png"
            )
    ds = load_dataset(f"seg:{ade}")
    assert set(ds.splits) == {"train", "test"} and ds.class_names == ("0", "1", "2")
    m = np.asarray(ds.load_mask("train", 0))
    want = np.where(np.arange(48).reshape(6, 8) % 4 == 0, 255, np.arange(48).reshape(6, 8) % 4 - 1)
    assert np.array_equal(m, want)

    plain = tmp_path / "plain"
    (plain / "images").mkdir(parents=True)
    (plain / "masks").mkdir()
    Image.new("RGB", (5, 5)).save(plain / "images" / "a.png")
    Image.fromarray(np.full((5, 5), 2, np.uint8), mode="L").save(plain / "masks" / "a.png")
    (plain / "classes.txt").write_text("sky\nroad\ncar\n")
    ds = load_dataset(f"seg:{plain}")
    assert ds.class_names == ("sky", "road", "car") and list(ds.splits) == ["train"]
    assert ds.fingerprint != load_dataset(f"seg:{ade}").fingerprint
    Image.new("RGB", (5, 5)).save(plain / "images" / "b.png")
    with pytest.raises(DatasetError, match=r"b.png .* has no mask"):
        load_dataset(f"seg:{plain}")
    with pytest.raises(DatasetError, match="no known layout"):
        load_dataset(f"seg:{tmp_path}")
