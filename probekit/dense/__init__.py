"""Dense probes on stored patch tokens and masks (`extract --tokens` on a segmentation dataset):
linear segmentation (`linseg`, DINOv2's linear protocol) and dense kNN (`dense-knn`,
Hummingbird). Each chooses its feature and hyperparameters on validation (a `val` split, else
a seeded holdout of train images) and is tested once: mIoU and pixel accuracy with intervals
over test images.

    linseg.py  batched batch-norm + 1x1 heads     knn.py  patch label distributions, voting
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from probekit._lazy import lazy_names

if TYPE_CHECKING:
    from probekit.dense.data import (
        DENSE_BANK_PATCHES,
        DenseData,
        DenseSelection,
        dense_records,
        row_blocks,
    )

__all__ = [
    "DENSE_BANK_PATCHES",
    "DenseData",
    "DenseSelection",
    "dense_records",
    "row_blocks",
]

__getattr__ = lazy_names(globals(), {name: "probekit.dense.data" for name in __all__})
