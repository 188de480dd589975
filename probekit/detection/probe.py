"""The box probe (`--method detect`): FCOS-style heads (`detection.head`) on stored tokens, every
(layer set, lr, wd) head trained on the grid trainer, one batched pass a layer set; each head
keeps its best epoch by validation COCO AP (then AP50), and the best head is tested once."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from probekit.probes.options import MethodOptions, option

if TYPE_CHECKING:
    import torch

    from probekit.detection.data import DetData, LayerSet
    from probekit.detection.head import BoxHead, GridHeads
    from probekit.detection.metrics import ImageDets
    from probekit.probes.optim import GridAdamW
    from probekit.probes.rows import Rows
else:
    from probekit._lazy import lazy_module

    torch = lazy_module("torch")

__all__ = ["BoxSelection", "Options", "select", "train_box_heads"]


@dataclass(frozen=True)
class Options(MethodOptions):
    """Box probe: its AdamW lr x wd grid, epochs, images a minibatch, head size, pyramid."""

    shown = ("lr", "wd", "epoch", "levels")
    lrs: tuple[float, ...] = option(
        (1e-3, 3e-4), "Box probe: AdamW learning rates (comma list).", "numbers>0", flat="det_lrs"
    )
    wds: tuple[float, ...] = option(
        (1e-4,), "Box probe: weight decays (comma list).", "numbers>=0", flat="det_wds"
    )
    epochs: int = option(12, "Box probe: passes over the train images.", "count", flat="det_epochs")
    batch_size: int = option(8, "Box probe: images a minibatch.", "count", flat="det_batch_size")
    width: int = option(64, "Box probe: the head's channels.", "count", flat="det_width")
    depth: int = option(
        2, "Box probe: 3x3 convolutions before the head's outputs.", "count", flat="det_depth"
    )
    sets: str = option(
        "all",
        "Box probe: the layer sets tried: every token layer as a simple pyramid and a CNN's "
        "stages together (all), the layers alone (layers), or the stages alone (stages).",
        "choice",
        flat="det_sets",
        choices=("all", "layers", "stages"),
    )
    scales: tuple[float, ...] = option(
        (2.0, 1.0, 0.5),
        "Box probe: a layer's simple-pyramid scales (ViTDet's: 4,2,1,0.5; each a power of 2).",
        "numbers>0",
        flat="det_scales",
    )


def _check_scales(scales: Sequence[float]) -> None:
    from probekit.errors import OptionError

    bad = [s for s in scales if s not in (4.0, 2.0, 1.0, 0.5, 0.25)]
    if bad or len(set(scales)) != len(scales):
        raise OptionError(
            f"det-scales must be distinct powers of 2 among 4, 2, 1, 0.5, 0.25 (ViTDet's simple "
            f"pyramid), not {', '.join(map(str, scales))}."
        )


class _Grid:
    """G box heads of one layer set as a `GridModel`: AdamW steps on the heads' summed FCOS
    losses (each head its own gradient); scores are validation COCO AP and AP50."""

    def __init__(
        self,
        heads: GridHeads,
        opt: GridAdamW,
        layers: LayerSet,
        data: DetData,
        fit_boxes: list[Any],
        val_truth: tuple[list[Any], np.ndarray] | None,
        scales: Sequence[float],
    ):
        from probekit.detection.head import LevelSpec

        self.heads, self.opt, self.layers, self.data = heads, opt, layers, data
        self.scales = tuple(scales)
        self.fit_boxes, self.val_truth = fit_boxes, val_truth
        self.spec = LevelSpec(layers.strides)
        self.locs: torch.Tensor | None = None
        self.sizes: list[tuple[int, int]] = []

    def _locations(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """(P, 3) location centres of the levels (the same for every batch)."""
        if self.locs is None:
            from probekit.detection.head import locations

            if self.layers.pyramid:  # 2x2 transposed convolutions up, 2x2 max pooling down
                gh, gw = maps[0].shape[-2:]
                self.sizes = [
                    (int(gh * s), int(gw * s))
                    if s >= 1
                    else (gh // round(1 / s), gw // round(1 / s))
                    for s in self.scales
                ]
            else:
                self.sizes = [(int(m.shape[-2]), int(m.shape[-1])) for m in maps]
            self.locs = locations(self.sizes, self.layers.strides)
        return self.locs

    def state(self) -> dict[str, torch.Tensor]:
        return self.heads.state()

    def update(self, xb: torch.Tensor, yb: torch.Tensor, scale: float, step: int) -> None:
        from probekit.detection.data import maps_of
        from probekit.detection.head import detection_loss, targets

        maps = maps_of(xb, self.layers)
        locs = self._locations(maps)
        images = [self.fit_boxes[int(i)] for i in yb]
        t = targets(locs, self.spec, images, self.data.n_classes)
        out = self.heads(maps, self.layers.strides)  # (G, B, P, C + 5)
        loss = detection_loss(out, t, locs.to(out.device))
        params = list(self.heads.params.values())
        grads = torch.autograd.grad(loss.sum(), params)
        self.opt.step([g.unsqueeze(0) for g in grads], scale)

    def detections(self, rows: Rows) -> list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
        """Every head's detections on every row: [head][image] (boxes, scores, classes)."""
        from probekit.detection.data import maps_of
        from probekit.detection.head import decode

        g = next(iter(self.heads.params.values())).shape[0]
        out: list[list[Any]] = [[] for _ in range(g)]
        with torch.no_grad():
            for xb in rows.blocks():
                for s in range(0, xb.shape[1], 16):
                    maps = maps_of(xb[:, s : s + 16], self.layers)
                    locs = self._locations(maps)
                    z = self.heads(maps, self.layers.strides)
                    for gi in range(g):
                        out[gi] += decode(z[gi], locs, self.data.size)
        return out

    def scores(self, rows: Rows, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        from probekit.detection.metrics import coco_metrics

        assert self.val_truth is not None
        truth, scales = self.val_truth
        main, tie = [], []
        for found in self.detections(rows):
            dets = _scaled(found, scales)
            m = coco_metrics(truth, dets, self.data.n_classes)
            main.append(m["ap"])
            tie.append(m["ap50"])
        return np.array([main]), np.array([tie])


def _scaled(found: list[Any], scales: np.ndarray) -> list[ImageDets]:
    """Detections in input pixels as the images' own pixels."""
    from probekit.detection.metrics import ImageDets

    return [ImageDets(b / s, sc, c) for (b, sc, c), s in zip(found, scales, strict=True)]


def _decayed(head: BoxHead) -> list[str]:
    """The parameters AdamW decays: convolution weights (not biases, not normalizations)."""
    from torch import nn

    names = []
    for mod_name, mod in head.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d)):
            names.append(f"{mod_name}.weight")
    return names


@dataclass
class TrainedHeads:
    """One layer set's G trained heads: their grid, epochs and validation scores (1, G)."""

    layers: LayerSet
    grid: _Grid
    epoch: np.ndarray
    val_ap: np.ndarray
    val_ap50: np.ndarray


def train_box_heads(
    data: DetData,
    layers: LayerSet,
    options: Options,
    x: Rows,
    fit_boxes: list[Any],
    x_val: Rows | None = None,
    val_truth: tuple[list[Any], np.ndarray] | None = None,
) -> TrainedHeads:
    """Every (lr, wd) head of one layer set trained on the same minibatches (the grid
    trainer): AdamW, a linear warmup over the first epoch, then a cosine; with validation
    rows each head keeps its best epoch (COCO AP, then AP50)."""
    from probekit.detection.head import BoxHead, GridHeads
    from probekit.probes.grid import train_grid, warmup_cosine_schedule
    from probekit.probes.optim import GridAdamW

    grid_list = [(lr, wd) for lr in options.lrs for wd in options.wds]
    torch.manual_seed(data.options.seed)  # every head starts where it would alone
    head = BoxHead(
        [d for _, _, d in layers.shapes],
        data.n_classes,
        options.scales if layers.pyramid else (),
        options.width,
        options.depth,
    )
    heads = GridHeads(head, len(grid_list))
    opt = GridAdamW(
        heads.state(), [lr for lr, _ in grid_list], [wd for _, wd in grid_list], _decayed(head)
    )
    model = _Grid(heads, opt, layers, data, fit_boxes, val_truth, options.scales)
    batch = min(options.batch_size, max(1, x.n))
    fit = train_grid(
        model,
        x,
        torch.arange(x.n),
        epochs=options.epochs,
        batch_size=batch,
        seed=data.options.seed,
        schedule=warmup_cosine_schedule(max(1, math.ceil(x.n / batch))),
        val=x_val,
        y_val=None if x_val is None else torch.arange(x_val.n),
    )
    return TrainedHeads(layers, model, fit.epoch, fit.main, fit.tie)


@dataclass
class BoxSelection:
    """What the box probe chose on validation, and how to detect with it.

    config: the chosen layer set, lr, wd, epoch, levels and validation AP / AP50; curve:
    (layer set, its best configuration, its validation AP) of every layer set;
    detect(split, rows): each row's detections in input pixels."""

    method: str
    feature: str
    config: dict[str, Any]
    curve: list[tuple[str, dict[str, Any], float]]
    detect: Callable[[str, np.ndarray], list[tuple[np.ndarray, np.ndarray, np.ndarray]]]


def select(data: DetData, options: Options) -> BoxSelection:
    """Every (layer set, lr, wd) head trained, one batched pass a layer set; the head of the
    best validation AP (then AP50; the first in grid order among equals) is chosen."""
    from probekit.detection.data import describe, layer_sets, set_rows
    from probekit.errors import ProbekitError
    from probekit.probes.grid import diverged

    _check_scales(options.scales)
    if not data.any_boxes(data.val_split, data.val_rows):
        raise ProbekitError(
            "the validation images hold no box to find: the box probe chooses its head on "
            "validation AP; give a `val` split with boxes or more train images."
        )
    grid_list = [(lr, wd) for lr in options.lrs for wd in options.wds]
    fit_boxes = data.boxes("train", data.fit_rows)
    val_truth = data.truth(data.val_split, data.val_rows)
    curve: list[tuple[str, dict[str, Any], float]] = []
    trained: list[tuple[TrainedHeads, int]] = []
    sets = [
        s
        for s in layer_sets(data.store, options.scales, data.names())
        if options.sets == "all" or (options.sets == "stages") != s.pyramid
    ]
    if not sets:
        raise ProbekitError(
            f"the store's token layers ({', '.join(data.names())}) come at one stride: they "
            "have no stages to put together; use det-sets all or layers, or extract a CNN's "
            "layers at several strides (--layers)."
        )
    for layers in sets:
        x = set_rows(data.store, "train", layers, data.fit_rows, data.budget // 2, data.device)
        xv = set_rows(
            data.store, data.val_split, layers, data.val_rows, data.budget // 4, data.device
        )
        t = train_box_heads(data, layers, options, x, fit_boxes, xv, val_truth)
        g = int(np.lexsort((-t.val_ap50[0], -t.val_ap[0]))[0])
        lr, wd = grid_list[g]
        cfg = {"lr": lr, "wd": wd, "epoch": int(t.epoch[0, g]), **describe(layers)}
        curve.append((layers.label, cfg, float(t.val_ap[0, g])))
        trained.append((t, g))
    best = max(
        range(len(trained)),
        key=lambda i: (
            trained[i][0].val_ap[0, trained[i][1]],
            trained[i][0].val_ap50[0, trained[i][1]],
            -i,
        ),
    )
    chosen, g = trained[best]
    diverged("box probe", float(chosen.val_ap[0, g]), grid_list)
    layers = chosen.layers
    config = {
        **curve[best][1],
        "batch_size": min(options.batch_size, len(data.fit_rows)),
        "optimizer": "adamw",
        "width": options.width,
        "depth": options.depth,
        "val_ap": float(chosen.val_ap[0, g]),
        "val_ap50": float(chosen.val_ap50[0, g]),
    }

    def detect(split: str, rows: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        x = set_rows(data.store, split, layers, rows, data.budget // 2, data.device)
        return chosen.grid.detections(x)[g]

    return BoxSelection("detect", layers.label, config, curve, detect)
