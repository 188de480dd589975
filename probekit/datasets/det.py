"""Detection datasets on disk (`det:PATH`): images with object boxes, in the three layouts users
have. Each image's row holds its boxes (`datasets.boxes`); an annotation that cannot be used
(a box outside the image, of zero area or of an unknown class, a missing image) makes the
row invalid with its reason (an error under `--strict`).

- COCO: `annotations/instances_<split>.json` with the images in `<split>/` or
  `images/<split>/` (or `images/`). Boxes are [x, y, w, h] in pixels; `iscrowd` boxes are
  kept as crowd (never trained on; matched as crowd by the metric); `area` is COCO's.
  Categories are taken in the order of their ids.
- Pascal VOC: `Annotations/<id>.xml`, `JPEGImages/<id>.jpg`, `ImageSets/Main/<split>.txt`.
  VOC's corners are 1-based and inclusive: (xmin - 1, ymin - 1, xmax, ymax) in pixels.
  `difficult` boxes are kept as difficult (never trained on; ignored by the metric, as VOC's
  evaluation does). Classes: `classes.txt`, else the 20 VOC classes where every name is one
  of them, else the names found, sorted.
- YOLO: `images/<split>/<name>.<ext>` with `labels/<split>/<name>.txt`, a line a box
  `class cx cy w h` (fractions of the image's size); an image without a label file has no
  boxes. Classes: `classes.txt`, or `names` of `data.yaml`.

Split names: a trailing year is dropped (`train2017` -> train). The evaluated split is `test`:
where a layout has `val` and no `test`, `val` becomes `test` (as for `seg:`); probes carve
their validation rows from train.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from probekit.datasets.boxes import CROWD, DIFFICULT, Boxes, ImageBoxes, build_boxes
from probekit.datasets.common import (
    IMG_EXTENSIONS,
    Dataset,
    Split,
    digest,
    is_image,
    overlap_warnings,
    slug,
    sorted_splits,
    user_path,
)
from probekit.datasets.seg import VOC_CLASSES
from probekit.errors import DatasetError

__all__ = ["det_dataset"]

# what a layout's reader gives: per split, (image path, its boxes) in a stable order
Found = dict[str, list[tuple[str, ImageBoxes]]]


def _split_name(name: str) -> str:
    base = re.sub(r"[-_]?\d{4}$", "", name)
    return {"validation": "val", "valid": "val"}.get(base, base)


def _evaluated(found: Mapping[str, Any]) -> dict[str, str]:
    """Each split's name in the store: `val` becomes `test` where there is no `test`."""
    names = {s: s for s in found}
    if "val" in names and "test" not in names:
        names["val"] = "test"
    return names


def _coco(root: Path) -> tuple[Found, tuple[str, ...], list[str]]:
    files = sorted((root / "annotations").glob("instances_*.json"))
    found: Found = {}
    categories: list[tuple[int, str]] | None = None
    digests = []
    for f in files:
        raw = f.stem.removeprefix("instances_")
        try:
            doc = json.loads(f.read_text())
            cats = sorted((int(c["id"]), str(c["name"])) for c in doc["categories"])
            images = {int(im["id"]): im for im in doc["images"]}
            anns = doc.get("annotations", [])
        except (ValueError, KeyError, TypeError) as e:
            raise DatasetError(f"det:{root}: {f.name} is not COCO instances JSON ({e}).") from None
        if categories is None:
            categories = cats
        elif cats != categories:
            raise DatasetError(
                f"det:{root}: {f.name} has other categories than {files[0].name}; give every "
                "split the same categories."
            )
        folder = next(
            (d for d in (root / raw, root / "images" / raw, root / "images") if d.is_dir()), None
        )
        if folder is None:
            raise DatasetError(
                f"det:{root}: no image folder for {f.name} ({raw}/, images/{raw}/ or images/)."
            )
        index = {cid: i for i, (cid, _) in enumerate(cats)}
        names = dict(cats)
        per: dict[int, ImageBoxes] = {}
        for image_id, im in images.items():
            path = folder / str(im.get("file_name", ""))
            size = (int(im["width"]), int(im["height"])) if "width" in im else None
            missing = None if path.is_file() else f"image file missing: {im.get('file_name')}"
            per[image_id] = ImageBoxes([], size, missing)
        for k, a in enumerate(anns):
            try:
                x, y, w, h = (float(v) for v in a["bbox"])
                cid = int(a["category_id"])
                entry = per[int(a["image_id"])]
            except (KeyError, TypeError, ValueError) as e:
                raise DatasetError(
                    f"det:{root}: {f.name} annotation {k} is not a COCO box ({e})."
                ) from None
            flag = CROWD if a.get("iscrowd") else 0
            area = a.get("area")
            entry.boxes.append(
                (
                    index.get(cid),
                    names.get(cid, str(cid)),
                    x,
                    y,
                    x + w,
                    y + h,
                    flag,
                    None if area is None else float(area),
                )
            )
        rows = sorted((str(folder / str(images[i].get("file_name", ""))), per[i]) for i in images)
        found[_split_name(raw)] = [(p, b) for p, b in rows]
        digests.append(f"{f.name}\t{digest(f.read_bytes())}")
    return found, tuple(n for _, n in categories or []), digests


def _voc(root: Path) -> tuple[Found, tuple[str, ...], list[str]]:
    sets = root / "ImageSets" / "Main"
    parsed: dict[str, list[tuple[str, ImageBoxes, list[str]]]] = {}
    names_seen: set[str] = set()
    digests = []
    for listed in sorted(sets.glob("*.txt")):
        if listed.stem not in ("train", "val", "test"):
            continue  # trainval and the per-class lists repeat these
        rows = []
        for line_no, line in enumerate(listed.read_text().splitlines(), start=1):
            stem = line.strip().split(" ")[0] if line.strip() else ""
            if not stem:
                continue
            xml = root / "Annotations" / f"{stem}.xml"
            image = root / "JPEGImages" / f"{stem}.jpg"
            if not xml.is_file():
                raise DatasetError(
                    f"det:{root}: {listed.name} line {line_no} names {stem!r}, whose "
                    f"annotation {xml.name} is missing."
                )
            boxes, names = _voc_xml(xml, root)
            if not image.is_file():
                boxes.missing = f"image file missing: JPEGImages/{image.name}"
            names_seen.update(names)
            rows.append((str(image), boxes, names))
            digests.append(f"{xml.name}\t{digest(xml.read_bytes())}")
        parsed[_split_name(listed.stem)] = rows
    listed_names = _classes_txt(root)
    if listed_names:
        classes = listed_names
    elif names_seen <= set(VOC_CLASSES[1:]):
        classes = VOC_CLASSES[1:]
    else:
        classes = tuple(sorted(names_seen))
    index = {n: i for i, n in enumerate(classes)}
    found: Found = {}
    for split, rows in parsed.items():
        out: list[tuple[str, ImageBoxes]] = []
        for path, found_boxes, names in rows:
            found_boxes.boxes = [
                (index.get(n), n, *box[2:])  # type: ignore[misc]
                for n, box in zip(names, found_boxes.boxes, strict=True)
            ]
            out.append((path, found_boxes))
        found[split] = out
    return found, classes, digests


def _voc_xml(xml: Path, root: Path) -> tuple[ImageBoxes, list[str]]:
    """One VOC annotation: its boxes (class left for the caller) and their class names."""
    try:
        doc = ET.parse(xml).getroot()
        size = doc.find("size")
        wh = None
        if size is not None:
            wh = (int(float(size.findtext("width", "0"))), int(float(size.findtext("height", "0"))))
        boxes: list[Any] = []
        names = []
        for obj in doc.iter("object"):
            name = (obj.findtext("name") or "").strip()
            bb = obj.find("bndbox")
            if bb is None:
                raise ValueError(f"object {name!r} has no bndbox")
            x0, y0, x1, y1 = (
                float(bb.findtext(k, "nan")) for k in ("xmin", "ymin", "xmax", "ymax")
            )
            flag = DIFFICULT if (obj.findtext("difficult") or "0").strip() == "1" else 0
            boxes.append((None, name, x0 - 1, y0 - 1, x1, y1, flag, None))
            names.append(name)
    except (ET.ParseError, ValueError) as e:
        raise DatasetError(f"det:{root}: {xml.name} is not a VOC annotation ({e}).") from None
    return ImageBoxes(boxes, wh if wh and all(wh) else None), names


def _classes_txt(root: Path) -> tuple[str, ...]:
    listed = root / "classes.txt"
    if not listed.is_file():
        return ()
    return tuple(line.strip() for line in listed.read_text().splitlines() if line.strip())


def _yaml_names(root: Path) -> tuple[str, ...]:
    f = root / "data.yaml"
    if not f.is_file():
        return ()
    import yaml  # type: ignore[import-untyped]

    try:
        names = (yaml.safe_load(f.read_text()) or {}).get("names")
    except yaml.YAMLError as e:
        raise DatasetError(f"det:{root}: data.yaml is not YAML ({e}).") from None
    if isinstance(names, dict):
        return tuple(str(names[k]) for k in sorted(names))
    if isinstance(names, list):
        return tuple(str(n) for n in names)
    raise DatasetError(f"det:{root}: data.yaml has no `names` list or mapping.")


def _yolo(root: Path) -> tuple[Found, tuple[str, ...], list[str]]:
    classes = _classes_txt(root) or _yaml_names(root)
    if not classes:
        raise DatasetError(
            f"det:{root}: a YOLO layout needs its class names: classes.txt (one a line) or "
            "data.yaml with `names`."
        )
    found: Found = {}
    digests = []
    folders = [d for d in sorted((root / "images").iterdir()) if d.is_dir()]
    for folder in folders or [root / "images"]:
        labels = root / "labels" / folder.name if folders else root / "labels"
        rows = []
        for image in sorted(p for p in folder.iterdir() if is_image(p)):
            txt = labels / f"{image.stem}.txt"
            boxes = ImageBoxes()
            if txt.is_file():
                text = txt.read_text()
                digests.append(f"{folder.name}/{txt.name}\t{digest(text)}")
                for line_no, line in enumerate(text.splitlines(), start=1):
                    if not line.strip():
                        continue
                    try:
                        c, cx, cy, w, h = line.split()
                        k = int(c)
                        x, y, bw, bh = (float(v) for v in (cx, cy, w, h))
                    except ValueError:
                        boxes.missing = (
                            f"{txt.name} line {line_no} is not `class cx cy w h`: {line[:40]!r}"
                        )
                        break
                    known = k if 0 <= k < len(classes) else None
                    boxes.boxes.append(
                        (known, c, x - bw / 2, y - bh / 2, x + bw / 2, y + bh / 2, 0, None)
                    )
            rows.append((str(image), boxes))
        found[_split_name(folder.name) if folders else "train"] = rows
    return found, classes, digests


LAYOUTS: dict[str, Callable[[Path], tuple[Found, tuple[str, ...], list[str]]]] = {
    "coco": _coco,
    "voc": _voc,
    "yolo": _yolo,
}


def _layout(root: Path) -> str:
    if any((root / "annotations").glob("instances_*.json")):
        return "coco"
    if (root / "ImageSets" / "Main").is_dir() and (root / "Annotations").is_dir():
        return "voc"
    if (root / "images").is_dir() and (root / "labels").is_dir():
        return "yolo"
    raise DatasetError(
        f"det:{root}: no known layout: COCO (annotations/instances_<split>.json), Pascal VOC "
        "(Annotations/, JPEGImages/, ImageSets/Main/<split>.txt) or YOLO (images/<split>/, "
        "labels/<split>/, classes.txt or data.yaml)."
    )


def det_dataset(arg: str) -> Dataset:
    """`det:PATH`: the layout found at PATH (COCO JSON, Pascal VOC XML or YOLO text)."""
    if not arg:
        raise DatasetError("det needs a path: det:PATH (COCO, Pascal VOC or YOLO layout).")
    root = user_path(arg, "det")
    if not root.is_dir():
        raise DatasetError(f"det path {str(root)!r} is not a directory.")
    layout = _layout(root)
    found, classes, digests = LAYOUTS[layout](root)
    found = {k: v for k, v in found.items() if v}
    if not found:
        raise DatasetError(f"det:{root} lists no images; check the layout.")
    if not classes:
        raise DatasetError(f"det:{root} names no classes.")
    renamed = _evaluated(found)
    return boxes_dataset(
        f"det:{root}",
        f"det-{slug(root.name)}",
        layout,
        classes,
        {renamed[s]: rows for s, rows in found.items()},
        [str(root), *digests],
        root,
    )


def boxes_dataset(
    canonical: str,
    name: str,
    layout: str,
    classes: Sequence[str],
    found: Mapping[str, list[tuple[str, ImageBoxes]]],
    parts: Sequence[str],
    root: Path,
) -> Dataset:
    """A detection `Dataset` of image files and their boxes, per split."""
    splits, boxes, listing = {}, {}, list(parts)
    for split in sorted_splits(list(found)):
        rows = found[split]
        b: Boxes = build_boxes([ib for _, ib in rows], len(classes), layout == "yolo")
        ids = tuple(p for p, _ in rows)
        splits[split] = Split(split, ids, b.labels())
        boxes[split] = b
        for p in ids:
            path = Path(p)
            if path.is_file() and path.suffix.lower() in IMG_EXTENSIONS:
                st = path.stat()
                rel = path.relative_to(root) if path.is_relative_to(root) else path
                listing.append(f"{split}\t{rel}\t{st.st_size}\t{st.st_mtime_ns}")
        listing.append(digest(b.digest()))
    return Dataset(
        canonical,
        f"{name}-{digest(canonical)[:8]}",
        tuple(classes),
        splits,
        digest(layout, "\n".join(listing)),
        warnings=overlap_warnings({n: sp.ids for n, sp in splits.items()}, "path"),
        boxes=boxes,
        box_layout=layout,
    )
