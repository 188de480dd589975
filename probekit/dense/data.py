"""Dense probes' data (tokens and masks split into fit and validation images), what a dense
method chose, and the records of its test: the stage every dense method shares."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from probekit.cache.store import FeatureStore
from probekit.errors import ProbekitError
from probekit.evaluation import warned
from probekit.records import Record
from probekit.segmentation import bootstrap_dense, class_counts, mean_iou, pixel_accuracy

if TYPE_CHECKING:
    from probekit.probes.base import ProbeOptions

__all__ = ["DENSE_BANK_PATCHES", "DenseData", "DenseSelection", "dense_records", "row_blocks"]

# the dense kNN memory bank holds at most this many train patches (a seeded sample beyond it)
DENSE_BANK_PATCHES = 2**18
# rows of tokens read from the store at once, at most this many bytes (float32)
READ_BYTES = 16 * 2**20


@dataclass
class DenseData:
    """One store's tokens and masks split into fit and validation images, for dense probes."""

    store: FeatureStore
    options: ProbeOptions
    names: list[str]  # token arrays
    n_classes: int
    size: tuple[int, int]  # the masks' (H, W)
    device: torch.device
    budget: int
    fit_rows: np.ndarray
    val_split: str
    val_rows: np.ndarray
    fit_masks: torch.Tensor  # (n_fit, H, W) uint8
    val_masks: torch.Tensor

    @classmethod
    def prepare(cls, store: FeatureStore, options: ProbeOptions) -> DenseData:
        from probekit.probes.rows import image_holdout, memory_budget

        if store.mask_shape is None:
            raise ProbekitError(
                f"{store.path.name} has no masks: dense probes (linseg, dense-knn) need a "
                "segmentation dataset (digit-scenes, seg:PATH) extracted with --tokens."
            )
        # the token arrays asked for; all of them where none was (a triage asks pooled ones)
        asked = [f for f in (options.features or ()) if f in store.token_names]
        names = asked or list(store.token_names)
        if not names:
            raise ProbekitError(
                f"{store.path.name} has no token arrays: dense probes read patch tokens; "
                "extract with --tokens all (or --tokens 8)."
            )
        if options.test_split not in store.splits or "train" not in store.splits:
            raise ProbekitError(
                f"dense probes need a train and a {options.test_split!r} split; the store has "
                f"{', '.join(store.splits)}."
            )
        val_split, fit_rows, val_rows = image_holdout(store, options.holdout, options.seed)
        device = options.torch_device()
        return cls(
            store,
            options,
            names,
            len(store.class_names),
            store.mask_shape,
            device,
            memory_budget(device, options.memory_mb),
            fit_rows,
            val_split,
            val_rows,
            torch.from_numpy(store.masks("train", fit_rows)),
            torch.from_numpy(store.masks(val_split, val_rows)),
        )

    def token_rows(self, split: str, names: Sequence[str], rows: np.ndarray, share: float) -> Any:
        """Token rows (L, n, T*D) of `names` within `share` of the budget (`token_rows`)."""
        from probekit.probes.rows import token_rows

        budget = int(self.budget * share)
        return token_rows(self.store, split, names, rows, budget, self.device)

    def groups(self) -> list[list[str]]:
        """Token arrays of one shape and grid together (trained in one batched pass)."""
        out: dict[tuple[Any, ...], list[str]] = {}
        for name in self.names:
            key = (self.store.token_shape(name), self.store.token_grid(name))
            out.setdefault(key, []).append(name)
        return list(out.values())


@dataclass
class DenseSelection:
    """What one dense method chose on validation, and how to segment any rows with it.

    config: the chosen feature and hyperparameters with `val_miou` and `val_pixel_acc`;
    curve: (feature, its best configuration, its validation mIoU) of every feature;
    confusions(split, rows): (n, C, C) per-image confusions of its predictions on those rows of
    the store's split (dense probes are tested on their own store).
    """

    method: str
    feature: str
    config: dict[str, Any]
    curve: list[tuple[str, dict[str, Any], float]]
    confusions: Callable[[str, np.ndarray], np.ndarray]


def row_blocks(rows: np.ndarray, row_bytes: int) -> Iterator[np.ndarray]:
    """`rows` in consecutive pieces of at most READ_BYTES."""
    step = max(1, READ_BYTES // max(1, row_bytes))
    for s in range(0, len(rows), step):
        yield rows[s : s + step]


def _absent_classes(data: DenseData, test_masks: np.ndarray) -> list[str]:
    """Test classes with no pixel in the probe's train images (its fit and validation parts):
    never predicted, their IoU is 0; said with counts, as classification says them."""
    seen = np.union1d(np.unique(data.fit_masks.numpy()), np.unique(data.val_masks.numpy()))
    labels, counts = np.unique(test_masks, return_counts=True)
    keep = (labels != 255) & ~np.isin(labels, seen)
    if not keep.any():
        return []
    absent, pixels = labels[keep], int(counts[keep].sum())
    names = data.store.class_names
    named = ", ".join(repr(names[int(c)]) for c in absent[:5] if int(c) < len(names))
    more = f" and {len(absent) - 5} more" if len(absent) > 5 else ""
    return [
        f"{len(absent)} test classes have no train pixels ({named}{more}): their {pixels} test "
        "pixels can never be predicted, and their IoU is 0"
    ]


def dense_records(
    store: FeatureStore, options: ProbeOptions, methods: Sequence[str], base: Record
) -> tuple[list[Record], dict[str, dict[str, Any]]]:
    """Every dense method's validation curve and its chosen probe's test mIoU and pixel
    accuracy (intervals over images; per-image class counts kept for paired comparisons)."""
    from probekit.methods import PROBE_METHODS

    data = DenseData.prepare(store, options)
    records: list[Record] = []
    selected: dict[str, dict[str, Any]] = {}
    split = options.test_split
    test_rows = np.flatnonzero(store.usable(split))
    if not len(test_rows):
        raise ProbekitError(f"split {split!r} has no usable images to test on.")
    truth_n = len(test_rows)
    base = warned(base, _absent_classes(data, store.masks(split, test_rows)), base.dataset)
    for m in methods:
        sel: DenseSelection = PROBE_METHODS[m].select()(data, options.of_method(m))
        selected[m] = {"feature": sel.feature, **sel.config}
        records += [
            replace(
                base,
                split="val",
                feature=name,
                method=m,
                metric="val_miou",
                value=float(miou),
                n=len(data.val_rows),
                hyper=cfg,
            )
            for name, cfg, miou in sel.curve
        ]
        per = sel.confusions(split, test_rows)  # (n, C, C)
        cm = per.sum(0)
        ci = bootstrap_dense(per, seed=options.seed)
        at = replace(base, split=split, feature=sel.feature, method=m, n=truth_n, hyper=sel.config)
        counts = class_counts(per)
        records += [
            replace(
                at,
                metric="miou",
                value=mean_iou(cm),
                extra={**at.extra, "ci95": list(ci["miou"]), "class_counts": counts.tolist()},
            ),
            replace(
                at,
                metric="pixel_acc",
                value=pixel_accuracy(cm),
                extra={**at.extra, "ci95": list(ci["pixel_acc"])},
            ),
        ]
    return records, selected
