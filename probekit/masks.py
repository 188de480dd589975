"""Segmentation datasets by their earlier module: `probekit.datasets.seg` now."""

from __future__ import annotations

from probekit.datasets.common import read_mask
from probekit.datasets.seg import VOC_CLASSES, seg_dataset

__all__ = ["VOC_CLASSES", "read_mask", "seg_dataset"]
