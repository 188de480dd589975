"""Detection datasets: the three layouts' readers on small generated folders (bad annotations
end in their rows' reasons), boxes through each model's geometry against a mask-drawn
reference, the store's box arrays (written once, checked, repaired), and `digit-boxes`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import probekit
from probekit.datasets import load_dataset
from probekit.datasets.boxes import CROWD, DIFFICULT
from probekit.errors import ProbekitError, StoreError

SMALL = {"chunk_rows": 8, "batch_size": 4, "num_workers": 0, "quiet": True}


def _image(path: Path, w: int, h: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(np.uint8)
    Image.fromarray(pixels).save(path)


def _coco(root: Path) -> Path:
    """train2017 (4 images, one missing) and val2017 (2 images); categories by id 1 dog, 3 cat."""
    cats = [{"id": 3, "name": "cat"}, {"id": 1, "name": "dog"}]
    for split, names in (("train2017", "abcd"), ("val2017", "ef")):
        images, anns = [], []
        for k, name in enumerate(names):
            if name != "d":  # d.png is listed, never written
                _image(root / split / f"{name}.png", 64, 48, k)
            images.append({"id": k + 1, "file_name": f"{name}.png", "width": 64, "height": 48})
        boxes = {
            "train2017": [
                (1, 1, [4, 6, 20, 10], 0, 150.0),  # a dog: x0 4, y0 6, x1 24, y1 16
                (1, 3, [30, 20, 30, 28], 1, None),  # a crowd of cats
                (2, 3, [60, 10, 10, 10], 0, None),  # reaches x 70 of a 64-wide image
                (3, 1, [5, 5, 0, 7], 0, None),  # zero width
                (4, 1, [1, 1, 5, 5], 0, None),  # its image is missing
            ],
            "val2017": [(1, 7, [1, 1, 5, 5], 0, None), (2, 3, [0, 0, 64, 48], 0, None)],
        }[split]
        for k, (image_id, cat, bbox, crowd, area) in enumerate(boxes):
            ann = {"id": k, "image_id": image_id, "category_id": cat, "bbox": bbox}
            ann.update({"iscrowd": crowd, **({"area": area} if area else {})})
            anns.append(ann)
        doc = {"images": images, "annotations": anns, "categories": cats}
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))
    return root


def test_coco_layout_reads_boxes_crowd_and_bad_annotations(tmp_path: Path) -> None:
    ds = load_dataset(f"det:{_coco(tmp_path / 'coco')}")
    assert ds.class_names == ("dog", "cat") and ds.box_layout == "coco"
    assert list(ds.splits) == ["train", "test"]  # val2017 is the evaluated split
    train = ds.boxes["train"]
    assert train.offsets.tolist() == [0, 2, 2, 2, 2]
    np.testing.assert_array_equal(train.xyxy, [[4, 6, 24, 16], [30, 20, 60, 48]])
    assert train.classes.tolist() == [0, 1] and train.flags.tolist() == [0, CROWD]
    assert train.areas.tolist() == [150.0, 30 * 28]  # COCO's area where given
    assert train.invalid == {
        1: "box 0 (60, 10, 70, 20) lies outside the 64x48 image",
        2: "box 0 (5, 5, 5, 12) has zero area",
        3: "image file missing: d.png",
    }
    assert ds.splits["train"].labels.tolist() == [0, 0, 0, 0]  # the dog, crowds never count
    test = ds.boxes["test"]
    assert test.invalid == {0: "box 0 has class '7', not one of the 2 classes"}
    assert ds.splits["test"].labels.tolist() == [0, 1]


def test_coco_rows_with_bad_annotations_are_invalid_in_the_store(tmp_path: Path) -> None:
    root = _coco(tmp_path / "coco")
    res = probekit.extract("test_vit@random", f"det:{root}", cache_dir=tmp_path / "c", **SMALL)
    store = probekit.open_store(res.store_path)
    reasons = dict(store.invalid("train"))
    assert reasons[str(root / "train2017" / "b.png")].endswith("lies outside the 64x48 image")
    assert "No such file" in reasons[str(root / "train2017" / "d.png")]  # its read says why
    assert len(reasons) == 3 and res.invalid == 4
    table, offsets, _ = store.boxes("train")
    assert offsets.tolist() == [0, 2, 2, 2, 2] and table[:, 0].tolist() == [0, 0]
    with pytest.raises(ProbekitError, match="lies outside the 64x48 image"):
        probekit.extract(
            "test_vit@random", f"det:{root}", cache_dir=tmp_path / "s", strict=True, **SMALL
        )


def _voc(root: Path, names: tuple[str, ...] = ("dog", "cat")) -> Path:
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "Annotations").mkdir()
    objects = {
        "a": [("dog", (1, 1, 20, 10), 0), ("cat", (5, 5, 30, 40), 1)],
        "b": [(names[-1], (10, 12, 40, 30), 0)],
        "c": [("dog", (2, 2, 9, 9), 0)],
    }
    for stem, objs in objects.items():
        if stem != "c":
            _image(root / "JPEGImages" / f"{stem}.jpg", 50, 45)
        xml = "".join(
            f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin>"
            f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
            for n, b, d in objs
        )
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><size><width>50</width><height>45</height></size>{xml}</annotation>"
        )
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\nc\n")
    (root / "ImageSets" / "Main" / "val.txt").write_text("b\n")
    return root


def test_voc_layout_one_based_corners_difficult_and_classes(tmp_path: Path) -> None:
    ds = load_dataset(f"det:{_voc(tmp_path / 'voc')}")
    # every name is a VOC class: the 20 VOC classes, in VOC's order
    assert ds.class_names[:3] == ("aeroplane", "bicycle", "bird") and len(ds.class_names) == 20
    train = ds.boxes["train"]
    np.testing.assert_array_equal(train.xyxy, [[0, 0, 20, 10], [4, 4, 30, 40]])
    assert train.flags.tolist() == [0, DIFFICULT]
    assert [ds.class_names[c] for c in train.classes] == ["dog", "cat"]
    assert train.invalid == {1: "image file missing: JPEGImages/c.jpg"}
    assert list(ds.splits) == ["train", "test"]
    other = _voc(tmp_path / "voc2", names=("dog", "cat", "zebra"))
    (other / "classes.txt").write_text("dog\ncat\n")
    ds = load_dataset(f"det:{other}")
    assert ds.class_names == ("dog", "cat")
    assert ds.boxes["test"].invalid == {0: "box 0 has class 'zebra', not one of the 2 classes"}


def _yolo(root: Path) -> Path:
    for split, stems in (("train", "abc"), ("val", "d")):
        for k, stem in enumerate(stems):
            _image(root / "images" / split / f"{stem}.png", 80, 40, k)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    labels = root / "labels"
    (labels / "train" / "a.txt").write_text("1 0.5 0.5 0.25 0.5\n0 0.5 0.3 0.2 0.2\n")
    (labels / "train" / "b.txt").write_text("0 0.5 0.5 half 0.2\n")  # not a number
    # c has no label file: an image without boxes
    (labels / "val" / "d.txt").write_text("5 0.5 0.5 0.1 0.1\n")  # class 5 of 2
    (root / "data.yaml").write_text("names:\n  0: person\n  1: bike\n")
    return root


def test_yolo_layout_normalized_boxes_through_the_store(tmp_path: Path) -> None:
    root = _yolo(tmp_path / "yolo")
    ds = load_dataset(f"det:{root}")
    assert ds.class_names == ("person", "bike") and ds.boxes["train"].normalized
    assert ds.boxes["train"].invalid == {
        1: "b.txt line 1 is not `class cx cy w h`: '0 0.5 0.5 half 0.2'"
    }
    assert ds.boxes["test"].invalid == {0: "box 0 has class '5', not one of the 2 classes"}
    assert ds.boxes["train"].offsets.tolist() == [0, 2, 2, 2]
    res = probekit.extract("test_vit@random", f"det:{root}", cache_dir=tmp_path / "c", **SMALL)
    store = probekit.open_store(res.store_path)
    table, offsets, scales = store.boxes("train")
    assert offsets.tolist() == [0, 2, 2, 2]
    geometry = _geometry(store)
    # the fractions of an 80x40 image in its pixels, then through the model's geometry
    pixels = np.array([[30, 10, 50, 30], [32, 8, 48, 16]], float)
    expected, _, scale = geometry.boxes(pixels, (80, 40))
    np.testing.assert_allclose(table[:, 2:6], expected)
    np.testing.assert_allclose(scales, [scale, 0, scale])  # b's row is invalid: never read
    np.testing.assert_allclose(table[:, 7], [20 * 20, 16 * 8])  # areas in the image's pixels
    assert store.meta["box_stats"]["train"] == {"boxes": 2, "clipped": 0, "dropped": 0}


def _geometry(store: probekit.FeatureStore):  # type: ignore[no-untyped-def]
    from probekit.extraction.preprocess import Geometry

    return Geometry(dict(store.info.preprocessing))


@pytest.mark.parametrize("model", ["resnet18", "vit_small_patch16_224", "convnext_tiny"])
def test_boxes_through_the_geometry_equal_a_mask_drawn_reference(model: str) -> None:
    """Each box drawn into a mask, the mask sent through the image's transform (nearest), its
    bounding box taken again: the box's own transform is within a pixel of it."""
    import timm

    from probekit.extraction.preprocess import Geometry

    skeleton = timm.create_model(model, pretrained=False, pretrained_cfg_overlay={})
    config = timm.data.resolve_data_config({}, model=skeleton)
    geometry = Geometry({**config, "crop_pct": 0.8})
    rng = np.random.default_rng(0)
    worst, compared = 0.0, 0
    for _ in range(150):
        w, h = int(rng.integers(60, 500)), int(rng.integers(60, 500))
        x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
        x1, y1 = int(rng.integers(x0 + 6, w + 1)), int(rng.integers(y0 + 6, h + 1))
        mask = np.zeros((h, w), np.uint8)
        mask[y0:y1, x0:x1] = 1
        out = np.asarray(geometry.mask(Image.fromarray(mask, mode="L")))
        box, kept, _ = geometry.boxes(np.array([[x0, y0, x1, y1]], float), (w, h))
        ys, xs = np.nonzero(out)
        if kept[0] < 0.5 or not len(xs):
            continue
        reference = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        worst = max(worst, float(np.abs(box[0] - reference).max()))
        compared += 1
    assert compared >= 60 and worst <= 1.0, (compared, worst)


def test_a_box_cut_by_the_crop_is_clipped_one_mostly_outside_dropped() -> None:
    from probekit.extraction.preprocess import Geometry

    cfg = {"input_size": (3, 100, 100), "interpolation": "bilinear", "crop_pct": 0.5}
    cfg.update({"crop_mode": "center", "mean": (0.5,) * 3, "std": (0.5,) * 3})
    geometry = Geometry(cfg)  # a 200x200 image: resized to 200, its centre 100x100 kept
    boxes = np.array([[40, 40, 100, 100], [0, 0, 60, 60], [90, 90, 110, 110]], float)
    out, kept, scale = geometry.boxes(boxes, (200, 200))
    assert scale == 1.0
    np.testing.assert_allclose(out, [[0, 0, 50, 50], [0, 0, 10, 10], [40, 40, 60, 60]])
    np.testing.assert_allclose(kept, [50 * 50 / 3600, 100 / 3600, 1.0])


def test_digit_boxes_is_deterministic_with_small_large_and_overlapping_boxes() -> None:
    import torch
    from torchvision.ops import box_iou

    a, b = load_dataset("digit-boxes:40"), load_dataset("digit-boxes:40")
    assert a.fingerprint == b.fingerprint and list(a.splits) == ["train", "test"]
    assert a.class_names == tuple(str(d) for d in range(10))
    boxes = a.boxes["train"]
    assert not boxes.invalid and len(boxes) == 30
    areas = boxes.areas
    assert (areas < 32**2).any() and (areas > 96**2).any()
    overlapping = 0
    for i in range(len(boxes)):
        xy = torch.as_tensor(boxes.xyxy[boxes.rows(i)])
        iou = box_iou(xy, xy).fill_diagonal_(0)
        overlapping += int((iou > 0.05).any())
    assert overlapping >= 3
    # each box holds its digit's strokes: bright pixels inside, the image's size outside
    assert (boxes.xyxy >= 0).all() and (boxes.xyxy <= 224).all()


@pytest.fixture(scope="module")
def det_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("det")
    res = probekit.extract("test_vit@random", "digit-boxes:24", cache_dir=root, **SMALL)
    return root, res.store_path


def _copy(det_store: tuple[Path, str], tmp_path: Path) -> tuple[Path, Path]:
    root, store = det_store
    shutil.copytree(root, tmp_path / "c")
    return tmp_path / "c", tmp_path / "c" / Path(store).relative_to(root)


def test_the_store_holds_each_images_boxes_through_its_geometry(
    det_store: tuple[Path, str],
) -> None:
    store = probekit.open_store(det_store[1])
    ds = load_dataset("digit-boxes:24")
    geometry = _geometry(store)
    for split in ds.splits:
        table, offsets, scales = store.boxes(split)
        src = ds.boxes[split]
        expected, kept, scale = geometry.boxes(src.xyxy, (224, 224))
        np.testing.assert_allclose(scales, scale)
        keep = kept >= 0.5
        np.testing.assert_allclose(table[:, 2:6], expected[keep])
        assert table[:, 1].tolist() == src.classes[keep].tolist()
        np.testing.assert_allclose(table[:, 7], src.areas[keep])
        assert store.meta["box_stats"][split]["dropped"] == int((~keep).sum())
        assert offsets[-1] == len(table)
    assert probekit.verify(det_store[1]).ok


def test_damaged_boxes_are_found_and_repaired(det_store: tuple[Path, str], tmp_path: Path) -> None:
    import zarr

    for damage in ("deleted", "edited"):
        root, store = _copy(det_store, tmp_path / damage)
        if damage == "deleted":
            shutil.rmtree(store / "train/boxes/c")
            with pytest.raises(StoreError, match=r"train/boxes \(chunk file missing\)"):
                probekit.open_store(store)
        else:  # a plausible value: a box moved by 3 px, found by its crc32
            arr = zarr.open_array(str(store / "train/boxes"), mode="r+")
            row = arr[0]
            row[2] += 3
            arr[0] = row
            assert probekit.open_store(store).check().ok
            found = probekit.verify(store)
            assert "train/boxes (values differ from those written (crc32))" in found.summary()
            assert probekit.verify(store, repair=True).repaired  # marks, then re-extracts
        res = probekit.extract("test_vit@random", "digit-boxes:24", cache_dir=root, **SMALL)
        assert res.cache_hit == (damage == "edited") and probekit.verify(store).ok
        assert damage == "edited" or res.repaired
        clean = probekit.open_store(det_store[1]).boxes("train")
        for got, want in zip(probekit.open_store(store).boxes("train"), clean, strict=True):
            np.testing.assert_array_equal(got, want)
