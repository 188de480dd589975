"""Segmentation datasets on disk (`seg:PATH`): images with a mask each, in the three layouts
users have, and reading a mask (one class index a pixel, 255 ignored).

- Pascal VOC: `JPEGImages/<id>.jpg`, `SegmentationClass/<id>.png` (palette PNGs: the palette
  index is the class, 255 the ignored borders) and `ImageSets/Segmentation/{train,val}.txt`;
  the 21 VOC classes. VOC's `val` is the evaluated split: it becomes `test`.
- ADE20k: `images/{training,validation}/<id>.jpg` and `annotations/{...}/<id>.png`; label 0
  ("other") is ignored and label v is class v - 1 (the 150 classes); `validation` becomes
  `test`. Class names from `objectInfo150.csv` or `classes.txt` where present.
- Plain: `images/[<split>/]<name>.<ext>` with `masks/[<split>/]<name>.png` (same stem),
  class names one a line in `classes.txt` (else `0..max` of the masks' labels).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from probekit.datasets.common import (
    IMG_EXTENSIONS,
    Dataset,
    Split,
    digest,
    overlap_warnings,
    read_mask,
    slug,
    sorted_splits,
    user_path,
)
from probekit.errors import DatasetError
from probekit.segmentation import IGNORE

__all__ = ["VOC_CLASSES", "read_mask", "seg_dataset"]


VOC_CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


def _images(folder: Path) -> dict[str, Path]:
    return {
        p.stem: p
        for p in sorted(folder.iterdir())
        if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS and not p.name.startswith(".")
    }


def _voc(root: Path) -> tuple[dict[str, list[tuple[str, str]]], tuple[str, ...], str]:
    sets = root / "ImageSets" / "Segmentation"
    rows: dict[str, list[tuple[str, str]]] = {}
    for name, split in (("train", "train"), ("val", "test")):
        listed = sets / f"{name}.txt"
        if not listed.is_file():
            continue
        for line_no, line in enumerate(listed.read_text().splitlines(), start=1):
            stem = line.strip()
            if not stem:
                continue
            image = root / "JPEGImages" / f"{stem}.jpg"
            mask = root / "SegmentationClass" / f"{stem}.png"
            if not image.is_file() or not mask.is_file():
                raise DatasetError(
                    f"seg:{root}: {listed.name} line {line_no} names {stem!r}, whose "
                    f"{'image' if not image.is_file() else 'mask'} is missing."
                )
            rows.setdefault(split, []).append((str(image), str(mask)))
    return rows, VOC_CLASSES, "index"


def _pairs(images: Path, masks: Path, split: str, root: Path) -> list[tuple[str, str]]:
    out = []
    for stem, image in _images(images).items():
        mask = masks / f"{stem}.png"
        if not mask.is_file():
            raise DatasetError(
                f"seg:{root}: image {image.name} ({split}) has no mask {mask}; give every "
                "image a mask of the same name (.png)."
            )
        out.append((str(image), str(mask)))
    return out


def _class_names(root: Path, n_found: int) -> tuple[str, ...]:
    listed = root / "classes.txt"
    if listed.is_file():
        return tuple(line.strip() for line in listed.read_text().splitlines() if line.strip())
    info = root / "objectInfo150.csv"
    if info.is_file():
        with info.open(newline="") as f:
            return tuple(r["Name"].split(";")[0] for r in csv.DictReader(f))
    return tuple(str(i) for i in range(n_found))


def _max_label(rows: dict[str, list[tuple[str, str]]], rule: str) -> int:
    """One more than the largest label of the readable masks (an unreadable one is left to
    its row: invalid, with its reason, when extracted)."""
    top = 0
    for pairs in rows.values():
        for _, mask in pairs:
            try:
                with Image.open(mask) as im:
                    v = np.asarray(im).astype(np.int64)
            except (OSError, ValueError, SyntaxError):
                continue
            if rule == "ade":
                v = np.where(v == 0, IGNORE, v - 1)
            v = v[v != IGNORE]
            top = max(top, int(v.max()) + 1 if v.size else 0)
    return top


def seg_dataset(arg: str) -> Dataset:
    """`seg:PATH`: the layout found at PATH (VOC, ADE20k, or images/ + masks/)."""
    if not arg:
        raise DatasetError("seg needs a path: seg:PATH (VOC, ADE20k or images/ + masks/).")
    root = user_path(arg, "seg")
    if not root.is_dir():
        raise DatasetError(f"seg path {str(root)!r} is not a directory.")
    if (root / "ImageSets" / "Segmentation").is_dir():
        rows, names, rule = _voc(root)
        layout = "voc"
    elif (root / "images" / "training").is_dir() and (root / "annotations").is_dir():
        rule, layout = "ade", "ade"
        rows = {}
        for name, split in (("training", "train"), ("validation", "test")):
            if (root / "images" / name).is_dir():
                ann = root / "annotations" / name
                rows[split] = _pairs(root / "images" / name, ann, split, root)
        names = ()
    elif (root / "images").is_dir() and (root / "masks").is_dir():
        rule, layout = "index", "plain"
        subs = sorted(d.name for d in (root / "images").iterdir() if d.is_dir())
        if subs:
            rows = {s: _pairs(root / "images" / s, root / "masks" / s, s, root) for s in subs}
        else:
            rows = {"train": _pairs(root / "images", root / "masks", "train", root)}
        names = ()
    else:
        raise DatasetError(
            f"seg:{root}: no known layout: VOC (ImageSets/Segmentation, JPEGImages, "
            "SegmentationClass), ADE20k (images/training, annotations/training) or "
            "images/ with masks/."
        )
    rows = {k: v for k, v in rows.items() if v}
    if not rows:
        raise DatasetError(f"seg:{root} lists no images; check the layout.")
    if not names:
        listed = (root / "classes.txt").is_file() or (root / "objectInfo150.csv").is_file()
        names = _class_names(root, 0 if listed else _max_label(rows, rule))
    if len(names) > IGNORE:  # stored as 8-bit masks, 255 the ignored label
        raise DatasetError(
            f"seg:{root} has {len(names)} classes: probekit stores masks as 8-bit class "
            f"indices, at most {IGNORE} classes (255 is ignored)."
        )
    splits, mask_paths, listing = {}, {}, []
    for name in sorted_splits(list(rows)):
        pairs = sorted(rows[name])
        ids = tuple(image for image, _ in pairs)
        splits[name] = Split(name, ids, np.zeros(len(ids), dtype=np.int64))
        mask_paths[name] = tuple(mask for _, mask in pairs)
        for image, mask in pairs:
            for p in (image, mask):
                st = Path(p).stat()
                listing.append(
                    f"{name}\t{Path(p).relative_to(root)}\t{st.st_size}\t{st.st_mtime_ns}"
                )
    canonical = f"seg:{root}"
    return Dataset(
        canonical,
        f"seg-{slug(root.name)}-{digest(canonical)[:8]}",
        tuple(names),
        splits,
        digest(layout, "\n".join(listing)),
        warnings=overlap_warnings({n: sp.ids for n, sp in splits.items()}, "path"),
        mask_paths=mask_paths,
        mask_rule=rule,
    )
