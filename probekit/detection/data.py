"""Box probes' data: a detection store's train images split into fit and validation images, its
layer sets (one layer's tokens for a simple pyramid, or a CNN's stages at their own strides),
token rows of a layer set, and each image's boxes, for training (input pixels) and for the
metrics (the image's own pixels)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from probekit.cache.store import FeatureStore
from probekit.datasets.boxes import CROWD, DIFFICULT
from probekit.detection.metrics import ImageTruth
from probekit.errors import ProbekitError

if TYPE_CHECKING:
    from probekit.probes.base import ProbeOptions
    from probekit.probes.rows import Rows

__all__ = ["DetData", "LayerSet", "layer_sets", "set_rows"]


@dataclass(frozen=True)
class LayerSet:
    """Token arrays a head reads: one (its simple pyramid at `scales`) or several (levels at
    their own strides). `strides`: the levels' strides in input pixels."""

    label: str
    names: tuple[str, ...]
    shapes: tuple[tuple[int, int, int], ...]  # (gh, gw, D) each
    strides: tuple[float, ...]

    @property
    def pyramid(self) -> bool:
        return len(self.names) == 1


def layer_sets(
    store: FeatureStore, scales: Sequence[float], names: Sequence[str] | None = None
) -> list[LayerSet]:
    """Each stored token layer (of `names`, default all) as a simple pyramid at `scales`
    (ViTDet), and, where the layers come at several strides (a CNN), the deepest layer of each
    of the len(scales) largest strides together."""
    h = int(store.info.preprocessing.get("input_size", [3, 0, 0])[-2])
    out, by_stride = [], {}
    for name in names or store.token_names:
        gh, gw = store.token_grid(name)
        _, d = store.token_shape(name)
        stride = h / gh
        shape = ((gh, gw, d),)
        out.append(LayerSet(name, (name,), shape, tuple(stride / s for s in scales)))
        by_stride[stride] = (name, (gh, gw, d))  # the deepest layer at each stride
    if len(by_stride) >= 2:
        chosen = sorted(by_stride)[-len(scales) :]
        names = tuple(by_stride[s][0] for s in chosen)
        label = "stages(" + ",".join(n.split("/")[0] for n in names) + ")"
        out.append(LayerSet(label, names, tuple(by_stride[s][1] for s in chosen), tuple(chosen)))
    return out


def set_rows(
    store: FeatureStore,
    split: str,
    layers: LayerSet,
    rows: np.ndarray,
    budget: int,
    device: torch.device,
) -> Rows:
    """A layer set's token rows as (1, n, sum of T*D) in their stored dtype: held on `device`
    where they fit `budget`, else read from the store a block at a time."""
    from probekit.probes.rows import Rows

    widths = [gh * gw * d for gh, gw, d in layers.shapes]
    f32 = set(store.meta.get("float32_features", []))
    dtype = torch.float32 if any(n in f32 for n in layers.names) else torch.float16
    total = sum(widths)

    def read(pos: np.ndarray) -> torch.Tensor:
        out = torch.empty(1, len(pos), total, dtype=dtype, device=device)
        at = 0
        for name, w in zip(layers.names, widths, strict=True):
            part = store.tokens(split, name, rows[pos]).reshape(len(pos), -1)
            out[0, :, at : at + w] = torch.from_numpy(part).to(device, dtype)
            at += w
        return out

    row_bytes = total * torch.empty((), dtype=dtype).element_size()
    if row_bytes * len(rows) <= budget:
        data = read(np.arange(len(rows)))
        return Rows(len(rows), 1, total, dtype=dtype, device=device, data=data)
    block = max(1, budget // row_bytes)
    return Rows(len(rows), 1, total, dtype=dtype, device=device, read=read, block=block)


def maps_of(xb: torch.Tensor, layers: LayerSet) -> list[torch.Tensor]:
    """(1, B, sum T*D) rows as each layer's (B, D, gh, gw) float32 map."""
    out, at = [], 0
    x = xb[0]
    for gh, gw, d in layers.shapes:
        w = gh * gw * d
        part = x[:, at : at + w].float().reshape(len(x), gh, gw, d)
        out.append(part.permute(0, 3, 1, 2).contiguous())
        at += w
    return out


@dataclass
class DetData:
    """One detection store's fit and validation images with their boxes."""

    store: FeatureStore
    options: ProbeOptions
    n_classes: int
    size: tuple[int, int]  # the input's (H, W)
    device: torch.device
    budget: int
    fit_rows: np.ndarray
    val_split: str
    val_rows: np.ndarray
    # each split's (table, offsets, scales), read and checked once
    tables: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(
        default_factory=dict, repr=False
    )

    def _boxes(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if split not in self.tables:
            self.tables[split] = self.store.boxes(split)
        return self.tables[split]

    @classmethod
    def prepare(cls, store: FeatureStore, options: ProbeOptions) -> DetData:
        from probekit.probes.rows import image_holdout, memory_budget

        if not store.info.box_counts:
            raise ProbekitError(
                f"{store.path.name} has no boxes: box probes (detect) need a detection dataset "
                "(digit-boxes, det:PATH) extracted with --tokens."
            )
        if not store.token_names:
            raise ProbekitError(
                f"{store.path.name} has no token arrays: box probes read patch tokens; extract "
                "with --tokens all."
            )
        if options.test_split not in store.splits or "train" not in store.splits:
            raise ProbekitError(
                f"box probes need a train and a {options.test_split!r} split; the store has "
                f"{', '.join(store.splits)}."
            )
        val_split, fit, val = image_holdout(store, options.holdout, options.seed)
        input_size = store.info.preprocessing.get("input_size", [3, 0, 0])
        device = options.torch_device()
        return cls(
            store,
            options,
            len(store.class_names),
            (int(input_size[-2]), int(input_size[-1])),
            device,
            memory_budget(device, options.memory_mb),
            fit,
            val_split,
            val,
        )

    def boxes(
        self, split: str, rows: np.ndarray
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Each row's (boxes (k, 4) in input pixels, classes (k,), ignored (k,)): training
        targets (crowd and difficult boxes are ignored, never positives)."""
        table, offsets, _ = self._boxes(split)
        out = []
        for r in rows:
            t = table[offsets[r] : offsets[r + 1]]
            flags = t[:, 6].astype(np.int64)
            out.append((t[:, 2:6], t[:, 1].astype(np.int64), np.isin(flags, (CROWD, DIFFICULT))))
        return out

    def truth(self, split: str, rows: np.ndarray) -> tuple[list[ImageTruth], np.ndarray]:
        """Each row's ground truth in the image's own pixels (input pixels over its scale; the
        areas as annotated), and the rows' scales (what detections are divided by)."""
        table, offsets, scales = self._boxes(split)
        out = []
        for r in rows:
            t = table[offsets[r] : offsets[r + 1]]
            scale = scales[r] if scales[r] > 0 else 1.0
            flags = t[:, 6].astype(np.int64)
            out.append(
                ImageTruth(
                    t[:, 2:6] / scale,
                    t[:, 1].astype(np.int64),
                    np.isin(flags, (CROWD, DIFFICULT)),
                    t[:, 7],
                )
            )
        return out, np.where(scales[rows] > 0, scales[rows], 1.0)

    def names(self) -> list[str]:
        """The token arrays asked for (`features`), else every one the store holds."""
        asked = [f for f in (self.options.features or ()) if f in self.store.token_names]
        return asked or list(self.store.token_names)

    def any_boxes(self, split: str, rows: np.ndarray) -> bool:
        return any(len(b) and (~ign).any() for b, _, ign in self.boxes(split, rows))

    def layout(self) -> str:
        return str(self.store.meta.get("box_layout", ""))


def describe(layers: LayerSet) -> dict[str, Any]:
    return {"levels": [round(s, 3) for s in layers.strides], "layers": list(layers.names)}
