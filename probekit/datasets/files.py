"""Image folders (`imagefolder:PATH`) and CSV lists (`csv:FILE`)."""

from __future__ import annotations

import csv
from pathlib import Path

from probekit.datasets.common import (
    Dataset,
    file_dataset,
    is_image,
    subdirs,
    user_path,
)
from probekit.errors import DatasetError, not_a_file

__all__ = ["csv_dataset", "imagefolder_dataset"]


def imagefolder_dataset(arg: str) -> Dataset:
    if not arg:
        raise DatasetError("imagefolder needs a path: imagefolder:PATH.")
    root = user_path(arg, "imagefolder")
    if not root.is_dir():
        raise DatasetError(f"imagefolder path {str(root)!r} is not a directory.")
    tops = subdirs(root)
    nested = bool(tops) and all(
        subdirs(t) and not any(is_image(f) for f in t.iterdir()) for t in tops
    )
    rows: list[tuple[str, str, str]] = []
    if nested:  # PATH/<split>/<class>/<image>
        for split in tops:
            for cdir in subdirs(split):
                rows += [
                    (split.name, cdir.name, str(f)) for f in sorted(cdir.rglob("*")) if is_image(f)
                ]
    else:  # PATH/<class>/<image>: one split
        for cdir in tops:
            rows += [("train", cdir.name, str(f)) for f in sorted(cdir.rglob("*")) if is_image(f)]
    return file_dataset("imagefolder", root, rows)


def csv_dataset(arg: str) -> Dataset:
    path = user_path(arg, "csv")
    if why := not_a_file(path, "csv file"):
        raise DatasetError(why)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        fields = set(reader.fieldnames or [])
        if not {"path", "label"} <= fields:
            raise DatasetError(
                f"{path.name} needs a header with columns path,label[,split]; it has "
                f"{sorted(fields)}."
            )
        rows, lines = [], []
        for i, r in enumerate(reader, start=2):
            if not r["path"] or r["label"] in (None, ""):
                raise DatasetError(f"{path.name} line {i}: empty path or label.")
            p = Path(r["path"]).expanduser()
            p = p if p.is_absolute() else path.parent / p
            if not p.exists():
                raise DatasetError(f"{path.name} line {i}: image {str(p)!r} does not exist.")
            rows.append(((r.get("split") or "train").strip(), r["label"].strip(), str(p.resolve())))
            lines.append(i)
    return file_dataset("csv", path, rows, lines)
