"""Datasets by spec (`KIND:ARG`): one module a kind, one reader protocol, one registry.

A kind's module turns its spec's ARG into a `Dataset` (splits of ids and labels, class names,
and `reader`: what loads an image by its id in any process; `masks` where the kind has them);
everything the kinds share lives in `common.py`, which imports no kind. A new kind is a
module and one `DatasetKind` line here.

    common.py       Dataset, Split, read_image, the shared helpers
    files.py        imagefolder:PATH, csv:FILE          builtin.py  mnist5k, digits, ...
    hf.py  wds.py  torchvision.py  (datasets where users keep them)
    seg.py          seg:PATH (images with masks)     det.py  det:PATH (images with boxes)
    boxes.py        a split's boxes, checked
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from probekit.datasets.common import (
    IMG_EXTENSIONS,
    Dataset,
    Split,
    decode_image,
    overlap_warnings,
    read_image,
    to_rgb,
)
from probekit.errors import DatasetError, close_matches

__all__ = [
    "BUILTIN_DATASETS",
    "DATASET_KINDS",
    "IMG_EXTENSIONS",
    "Dataset",
    "DatasetKind",
    "Split",
    "decode_image",
    "load_dataset",
    "overlap_warnings",
    "read_image",
    "to_rgb",
]


@dataclass(frozen=True)
class DatasetKind:
    """One kind of dataset spec: `KIND:ARG` (or `KIND` alone), the function of its module that
    reads it (`module:function`, imported when a spec of the kind is loaded), what it is."""

    kind: str
    reader: str  # "probekit.datasets.files:imagefolder_dataset": ARG ("" when none) -> Dataset
    usage: str  # the spec as a user writes it
    summary: str
    takes_arg: bool = True  # False: `KIND` alone (a built-in)

    @property
    def load(self) -> Callable[[str], Dataset]:
        module, _, fn = self.reader.partition(":")
        load: Callable[[str], Dataset] = getattr(importlib.import_module(module), fn)
        return load


def load_dataset(spec: str) -> Dataset:
    """Parse a dataset spec and list its images (the kinds: `DATASET_KINDS`).

    Specs: `imagefolder:PATH` (PATH/<split>/<class>/<img> or PATH/<class>/<img>),
    `csv:FILE` (columns path,label[,split]), `mnist5k`, `digits`, `lfw-faces`,
    `synthetic[:N]` (N images per class, 4 classes, generated), and the others of
    `DATASET_KINDS`.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DatasetError("empty dataset spec; use e.g. imagefolder:PATH, csv:FILE or mnist5k.")
    kind, _, arg = spec.strip().partition(":")
    entry = DATASET_KINDS.get(kind)
    if entry is not None and (entry.takes_arg or not arg):
        return entry.load(arg)
    raise DatasetError(
        f"unknown dataset spec {spec!r}: use {', '.join(k.usage for k in DATASET_KINDS.values())}."
        + close_matches(kind, list(DATASET_KINDS))
    )


def timm_dataset(arg: str) -> Dataset:
    """timm's dataset names (`timm.data.create_dataset`) on our readers: hfds/NAME -> hf:,
    wds/PATTERN -> wds:, torch/NAME:ROOT -> torchvision:."""
    kind, _, rest = arg.partition("/")
    target = {"hfds": "hf", "hf-ds": "hf", "wds": "wds", "torch": "torchvision"}.get(kind)
    if target is None or not rest:
        raise DatasetError(
            f"timm:{arg}: use timm's names hfds/NAME, wds/PATTERN or torch/NAME:ROOT "
            "(tfds/ is not read: export it as WebDataset shards)."
        )
    if target == "torchvision":
        name, _, root = rest.partition(":")
        import torchvision

        found = {n.lower(): n for n in vars(torchvision.datasets)}
        rest = f"{found.get(name.lower(), name)}:{root}"
    return load_dataset(f"{target}:{rest}")


_D = "probekit.datasets"
# every kind of dataset spec: a new kind is a module and one entry here
DATASET_KINDS: dict[str, DatasetKind] = {
    k.kind: k
    for k in (
        DatasetKind(
            "imagefolder",
            f"{_D}.files:imagefolder_dataset",
            "imagefolder:PATH",
            "PATH/<split>/<class>/<img>",
        ),
        DatasetKind("csv", f"{_D}.files:csv_dataset", "csv:FILE", "columns path,label[,split]"),
        DatasetKind("mnist5k", f"{_D}.builtin:mnist5k", "mnist5k", "5000 MNIST digits", False),
        DatasetKind("digits", f"{_D}.builtin:digits", "digits", "scikit-learn's 8x8 digits", False),
        DatasetKind("lfw-faces", f"{_D}.builtin:lfw_faces", "lfw-faces", "faces vs not", False),
        DatasetKind(
            "synthetic", f"{_D}.builtin:synthetic", "synthetic[:N]", "generated, N per class"
        ),
        DatasetKind(
            "digit-scenes",
            f"{_D}.builtin:digit_scenes",
            "digit-scenes[:N]",
            "digits on photos, with masks",
        ),
        DatasetKind(
            "digit-boxes",
            f"{_D}.builtin:digit_boxes",
            "digit-boxes[:N]",
            "digits on photos, with boxes",
        ),
        DatasetKind("seg", f"{_D}.seg:seg_dataset", "seg:PATH", "VOC, ADE20k or images/ + masks/"),
        DatasetKind("det", f"{_D}.det:det_dataset", "det:PATH", "COCO, VOC or YOLO boxes"),
        DatasetKind("hf", f"{_D}.hf:hf_dataset", "hf:NAME_OR_PATH", "Hugging Face"),
        DatasetKind("wds", f"{_D}.wds:wds_dataset", "wds:PATTERN", "WebDataset"),
        DatasetKind(
            "torchvision",
            f"{_D}.torchvision:torchvision_dataset",
            "torchvision:NAME:ROOT",
            "a torchvision dataset",
        ),
        DatasetKind("timm", f"{_D}:timm_dataset", "timm:NAME", "timm's dataset names"),
    )
}
BUILTIN_DATASETS = tuple(
    k.kind for k in DATASET_KINDS.values() if k.kind not in ("imagefolder", "csv", "seg", "det")
)
