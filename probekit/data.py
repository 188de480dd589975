"""The dataset API by its earlier name: `probekit.datasets` holds it (one module a kind)."""

from __future__ import annotations

from probekit.datasets import (
    BUILTIN_DATASETS,
    DATASET_KINDS,
    IMG_EXTENSIONS,
    Dataset,
    DatasetKind,
    Split,
    decode_image,
    load_dataset,
    overlap_warnings,
    read_image,
    to_rgb,
)

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
