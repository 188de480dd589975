"""Linear segmentation on stored patch tokens: DINOv2's linear protocol (a batch-norm and a 1x1
linear layer on one layer's tokens, or on the last four layers' concatenated, its low-resolution
logit map bilinearly upsampled to the mask, cross-entropy ignoring 255), every (feature, lr,
wd) head of the grid trained on the same minibatches in one batched pass.

One head, for tokens x (B, gh*gw, D) of an image batch and masks (B, H, W):

    x' = BatchNorm(x)             per channel over the batch's tokens (running stats in eval)
    z  = x' W^T + b               (B, gh, gw, C): one logit vector a patch
    logits = bilinear(z, (H, W))  align_corners=False, as `F.interpolate`

Batch statistics depend on the frozen tokens alone, never on a head's parameters: a batch's
loss can be taken in parts (bounded memory) with the same gradients. Selection: each head
keeps its best epoch by validation mIoU (then pixel accuracy); the best head is tested once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from probekit.defaults import (
    DEFAULT_SEG_BATCH_SIZE,
    DEFAULT_SEG_EPOCHS,
    DEFAULT_SEG_LRS,
    DEFAULT_SEG_WDS,
)
from probekit.probes.options import MethodOptions, option
from probekit.segmentation import IGNORE, mean_iou, pixel_accuracy

if TYPE_CHECKING:
    import torch
    import torch.nn.functional as F

    from probekit.dense import DenseData, DenseSelection
    from probekit.probes.optim import GridAdamW
    from probekit.probes.rows import Rows
else:
    from probekit._lazy import LazyAttributes, lazy_module

    torch = lazy_module("torch")
    F = LazyAttributes("torch.nn.functional")

__all__ = ["Options", "SegHeads", "select", "train_seg_heads"]


@dataclass(frozen=True)
class Options(MethodOptions):
    """Linear segmentation: its AdamW lr x wd grid, epochs and images a minibatch."""

    shown = ("lr", "wd", "epoch")
    lrs: tuple[float, ...] = option(
        DEFAULT_SEG_LRS,
        "Linear segmentation: AdamW learning rates (comma list).",
        "numbers>0",
        flat="seg_lrs",
    )
    wds: tuple[float, ...] = option(
        DEFAULT_SEG_WDS,
        "Linear segmentation: weight decays (comma list).",
        "numbers>=0",
        flat="seg_wds",
    )
    epochs: int = option(
        DEFAULT_SEG_EPOCHS,
        "Linear segmentation: passes over the train images.",
        "count",
        flat="seg_epochs",
    )
    batch_size: int = option(
        DEFAULT_SEG_BATCH_SIZE,
        "Linear segmentation: images a minibatch.",
        "count",
        flat="seg_batch_size",
    )


# logits upsampled at once: at most this many float32 values (the loss's activations are a
# few times this), whatever the batch
LOGIT_VALUES = 8 * 2**20
BN_EPS, BN_MOMENTUM = 1e-5, 0.1
DECAYED = ("weight", "gamma")  # AdamW's decoupled decay: the weights, not biases or shifts


@dataclass
class SegHeads:
    """L x G heads (L features of one token shape, G (lr, wd) configurations): each a
    batch-norm (affine gamma, beta (D,); running mean and variance (D,)) and a 1x1 layer
    (weight (C, D), bias (C,))."""

    params: dict[str, torch.Tensor]  # gamma, beta (L, G, D); weight (L, G, C, D); bias (L, G, C)
    running_mean: torch.Tensor  # (L, G, D): the same for every head of a feature while training
    running_var: torch.Tensor  # (L, G, D); each head keeps those of its best epoch
    grid: tuple[int, int]  # (gh, gw): the tokens' rows and columns
    epoch: np.ndarray  # (L, G) the epoch each head's weights are from
    val_miou: np.ndarray  # (L, G)
    val_acc: np.ndarray  # (L, G) pixel accuracy
    concat: bool = False  # the rows' L layers are one feature: their tokens side by side

    @property
    def shape(self) -> tuple[int, int]:
        return self.params["weight"].shape[0], self.params["weight"].shape[1]

    def low_res(
        self, x: torch.Tensor, mean: torch.Tensor | None = None, var: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(L, G, B, C, gh, gw) logits of tokens x (L, B, T, D), normalized by `mean` and `var`
        ((L, 1, D): a training batch's) or by the running statistics (evaluation). The
        normalization and the affine are folded into the 1x1 layer: x is never copied."""
        p = self.params
        mean = self.running_mean if mean is None else mean
        var = self.running_var if var is None else var
        scale = p["gamma"] * torch.rsqrt(var + BN_EPS)  # (L, G, D)
        w = p["weight"] * scale[:, :, None, :]
        b = p["bias"] + torch.einsum("lgcd,lgd->lgc", p["weight"], p["beta"] - scale * mean)
        z = torch.einsum("lbtd,lgcd->lgbct", x, w) + b[:, :, None, :, None]
        return z.reshape(*z.shape[:4], *self.grid)

    def logits(
        self,
        x: torch.Tensor,
        size: tuple[int, int],
        mean: torch.Tensor | None = None,
        var: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(L, G, B, C, H, W) logits of tokens x (L, B, T, D), bilinearly upsampled to `size`."""
        z = self.low_res(x, mean, var)
        n_feat, n_cfg, b, c = z.shape[:4]
        up = F.interpolate(z.reshape(-1, c, *self.grid), size=size, mode="bilinear")
        return up.reshape(n_feat, n_cfg, b, c, *size)

    def one(self, feature: int, cfg: int) -> SegHeads:
        """Head (feature, cfg) alone, as a 1 x 1 grid."""
        return SegHeads(
            {k: v[feature : feature + 1, cfg : cfg + 1] for k, v in self.params.items()},
            self.running_mean[feature : feature + 1, cfg : cfg + 1],
            self.running_var[feature : feature + 1, cfg : cfg + 1],
            self.grid,
            self.epoch[feature : feature + 1, cfg : cfg + 1],
            self.val_miou[feature : feature + 1, cfg : cfg + 1],
            self.val_acc[feature : feature + 1, cfg : cfg + 1],
            self.concat,
        )

    def confusions(
        self, rows: Rows, masks: torch.Tensor, n_classes: int, d: int, per_image: bool = False
    ) -> torch.Tensor:
        """(L, G, C, C) int64 confusions (truth, prediction) over the scored pixels of every
        row (token rows of width `d` a layer), or with `per_image` (L, G, N, C, C)."""
        n_feat, n_cfg = self.shape
        n, (h, w) = rows.n, masks.shape[1:]
        shape = (n_feat, n_cfg, n) if per_image else (n_feat, n_cfg)
        out = torch.zeros(*shape, n_classes * n_classes, dtype=torch.int64, device=rows.device)
        step = parts(n_feat * n_cfg * n_classes * h * w)
        start = 0
        with torch.no_grad():
            for xb in rows.blocks():
                for s in range(0, xb.shape[1], step):
                    x = _tokens(xb[:, s : s + step], d, self.concat)
                    m = masks[start + s : start + s + x.shape[1]].to(rows.device).long()
                    pred = self.logits(x, (h, w)).argmax(3)  # (L, G, b, H, W)
                    keep = (m != IGNORE).expand_as(pred)
                    code = m.clamp_max(n_classes - 1) * n_classes + pred
                    b, cc = x.shape[1], n_classes * n_classes
                    images = b if per_image else 1
                    if per_image:  # each image's codes apart: (image, truth, prediction)
                        code = torch.arange(b, device=pred.device)[:, None, None] * cc + code
                    for li in range(n_feat):
                        for gi in range(n_cfg):
                            counts = torch.bincount(
                                code[li, gi][keep[li, gi]], minlength=images * cc
                            )
                            if per_image:
                                out[li, gi, start + s : start + s + b] += counts.view(b, cc)
                            else:
                                out[li, gi] += counts
                start += xb.shape[1]
        return out.view(*shape, n_classes, n_classes)


def parts(values_per_image: int) -> int:
    """Images whose upsampled logits are taken at once (at least 1)."""
    return max(1, LOGIT_VALUES // max(1, values_per_image))


def _tokens(xb: torch.Tensor, d: int, concat: bool = False) -> torch.Tensor:
    """(L, b, T*D) stored rows as (L, b, T, D) float32; with `concat`, the L layers' tokens
    side by side as one feature (1, b, T, L*D)."""
    x = xb.float().reshape(*xb.shape[:2], -1, d)
    if concat:
        n_feat, b, t, _ = x.shape
        x = x.permute(1, 2, 0, 3).reshape(1, b, t, n_feat * d)
    return x


def _init(
    n_feat: int, n_cfg: int, d: int, n_classes: int, seed: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Batch-norm affine at identity; the 1x1 layer as `nn.Conv2d(d, C, 1)` initializes it
    (uniform in +-1/sqrt(d)), the same for every head (seeded): a head starts where it would
    alone."""
    gen = torch.Generator().manual_seed(seed)
    bound = 1 / math.sqrt(d)
    weight = (torch.rand(1, 1, n_classes, d, generator=gen) * 2 - 1) * bound
    bias = (torch.rand(1, 1, n_classes, generator=gen) * 2 - 1) * bound
    params = {
        "gamma": torch.ones(n_feat, n_cfg, d),
        "beta": torch.zeros(n_feat, n_cfg, d),
        "weight": weight.expand(n_feat, n_cfg, -1, -1).clone(),
        "bias": bias.expand(n_feat, n_cfg, -1).clone(),
    }
    return {k: v.to(device).requires_grad_() for k, v in params.items()}


def _batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, biased variance, unbiased variance), each (L, 1, D), over a batch's tokens."""
    flat = x.reshape(x.shape[0], -1, x.shape[-1])
    var, mean = torch.var_mean(flat, dim=1, correction=0, keepdim=True)
    count = flat.shape[1]
    return mean, var, var * (count / max(1, count - 1))


def _scores(
    heads: SegHeads, rows: Rows, masks: torch.Tensor, n_classes: int, d: int
) -> tuple[np.ndarray, np.ndarray]:
    """(mIoU, pixel accuracy), each (L, G), of every head on `rows`."""
    cms = heads.confusions(rows, masks, n_classes, d).cpu().numpy()
    n_feat, n_cfg = heads.shape
    miou = np.array([[mean_iou(cms[i, j]) for j in range(n_cfg)] for i in range(n_feat)])
    acc = np.array([[pixel_accuracy(cms[i, j]) for j in range(n_cfg)] for i in range(n_feat)])
    return np.nan_to_num(miou, nan=0.0), np.nan_to_num(acc, nan=0.0)


class _Grid:
    """Linear segmentation heads as a `GridModel`: each batch updates the batch-norm's running
    statistics, then AdamW steps on the heads' summed losses, taken in parts of at most
    LOGIT_VALUES upsampled logits (batch statistics do not depend on the heads, so the parts'
    gradients add up to the whole batch's)."""

    def __init__(
        self, heads: SegHeads, opt: GridAdamW, width: int, n_classes: int, size: tuple[int, int]
    ):
        self.heads, self.opt, self.width, self.n_classes, self.size = (
            heads,
            opt,
            width,
            n_classes,
            size,
        )
        n_feat, n_cfg = heads.shape
        self.step_images = parts(n_feat * n_cfg * n_classes * size[0] * size[1])

    def state(self) -> dict[str, torch.Tensor]:
        h = self.heads
        return {**h.params, "running_mean": h.running_mean, "running_var": h.running_var}

    def update(self, xb: torch.Tensor, yb: torch.Tensor, scale: float, step: int) -> None:
        heads, params = self.heads, self.heads.params
        n_feat, n_cfg = heads.shape
        x_b = _tokens(xb, self.width, heads.concat)
        mean, var, unbiased = _batch_stats(x_b)
        with torch.no_grad():
            heads.running_mean.lerp_(mean, BN_MOMENTUM)
            heads.running_var.lerp_(unbiased, BN_MOMENTUM)
        target = yb.long()
        scored = (target != IGNORE).sum().clamp_min(1)
        grads = [torch.zeros_like(p) for p in params.values()]
        every = self.step_images
        for s in range(0, len(target), every):
            logits = heads.logits(x_b[:, s : s + every], self.size, mean, var)
            t = target[s : s + every]
            loss = (
                F.cross_entropy(
                    logits.reshape(-1, self.n_classes, *self.size),
                    t.repeat(n_feat * n_cfg, 1, 1),
                    ignore_index=IGNORE,
                    reduction="sum",
                )
                / scored
            )
            for total_g, g in zip(
                grads, torch.autograd.grad(loss, list(params.values())), strict=True
            ):
                total_g += g
        self.opt.step(grads, scale)

    def scores(self, rows: Rows, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        return _scores(self.heads, rows, y, self.n_classes, self.width)


def train_seg_heads(
    x: torch.Tensor | Rows,
    masks: torch.Tensor,
    n_classes: int,
    grid: tuple[int, int],
    width: int,
    lrs: Sequence[float],
    wds: Sequence[float],
    *,
    epochs: int = 10,
    batch_size: int = 16,
    seed: int = 0,
    x_val: torch.Tensor | Rows | None = None,
    masks_val: torch.Tensor | None = None,
    window: int | None = None,
    concat: bool = False,
) -> SegHeads:
    """Train every (feature, lr, wd) linear segmentation head on the same minibatches (the
    grid trainer).

    x: (L, N, T*D) token rows of L features of one shape (T = gh*gw tokens of width D), or
    streamed `Rows` (with `concat`, the L layers side by side as one feature of width L*D);
    masks: (N, H, W) uint8 (255: ignore). AdamW (decoupled decay on gamma and
    the weights), a linear warmup over the first epoch (at most a tenth of the steps), then a
    cosine schedule; the loss of each head is its mean cross-entropy over the batch's scored
    pixels, summed over heads (each gets its own gradient: a batched head equals the same head
    trained alone). With validation rows each head keeps its best epoch (mIoU, then pixel
    accuracy); without, its last.
    """
    from probekit.probes.grid import train_grid, warmup_cosine_schedule
    from probekit.probes.optim import GridAdamW
    from probekit.probes.rows import Rows

    rows = x if isinstance(x, Rows) else Rows.of(x)
    val = None if x_val is None else (x_val if isinstance(x_val, Rows) else Rows.of(x_val))
    grid_list = [(lr, wd) for lr in lrs for wd in wds]
    n_feat, n, d = rows.layers, rows.n, width
    if concat:
        n_feat, d = 1, width * rows.layers
    n_cfg = len(grid_list)
    device = rows.device
    params = _init(n_feat, n_cfg, d, n_classes, seed, device)
    zeros = np.zeros((n_feat, n_cfg))
    state = SegHeads(
        params,
        torch.zeros(n_feat, n_cfg, d, device=device),
        torch.ones(n_feat, n_cfg, d, device=device),
        grid,
        np.full((n_feat, n_cfg), epochs),
        zeros.copy(),
        zeros.copy(),
        concat,
    )
    opt = GridAdamW(params, [lr for lr, _ in grid_list], [wd for _, wd in grid_list], DECAYED)
    h, w = masks.shape[1:]
    model = _Grid(state, opt, width, n_classes, (int(h), int(w)))
    fit = train_grid(
        model,
        rows,
        masks.to(device),
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        schedule=warmup_cosine_schedule(max(1, math.ceil(n / batch_size))),
        val=val,
        y_val=masks_val,
        window=window,
    )
    state.params = {k: v.detach() for k, v in params.items()}
    if val is not None:
        state.epoch, state.val_miou, state.val_acc = fit.epoch, fit.main, fit.tie
    return state


def select(data: DenseData, options: Options) -> DenseSelection:
    """Every (layer, lr, wd) head trained together (layers of one token shape as one batched
    pass), plus the last four layers concatenated where four layers of one shape are stored;
    the head of the best validation mIoU (then pixel accuracy) is chosen."""
    from probekit.dense import DenseSelection

    grid_list = [(lr, wd) for lr in options.lrs for wd in options.wds]
    n_classes = data.n_classes
    # layers of one shape in one pass; the last four of the last shape, concatenated, in its own
    groups = data.groups()
    passes: list[tuple[list[str], bool]] = [(g, False) for g in groups]
    if len(groups[-1]) >= 4:
        passes.append((groups[-1][-4:], True))
    curve: list[tuple[str, dict[str, Any], float]] = []
    trained: list[tuple[str, list[str], SegHeads]] = []
    for names, concat in passes:
        _, d = data.store.token_shape(names[0])
        grid = data.store.token_grid(names[0])
        x = data.token_rows("train", names, data.fit_rows, 0.5)
        xv = data.token_rows(data.val_split, names, data.val_rows, 0.25)
        heads = train_seg_heads(
            x,
            data.fit_masks,
            n_classes,
            grid,
            d,
            options.lrs,
            options.wds,
            epochs=options.epochs,
            batch_size=min(options.batch_size, max(1, x.n)),
            seed=data.options.seed,
            x_val=xv,
            masks_val=data.val_masks,
            concat=concat,
        )
        layers = ",".join(n.split("/")[0] for n in names)
        labels = [f"last4/tokens({layers})"] if concat else names
        for li, label in enumerate(labels):
            g = int(np.lexsort((-heads.val_acc[li], -heads.val_miou[li]))[0])
            lr, wd = grid_list[g]
            cfg = {"lr": lr, "wd": wd, "epoch": int(heads.epoch[li, g])}
            curve.append((label, cfg, float(heads.val_miou[li, g])))
            trained.append((label, names, heads.one(li, g)))
    best = max(
        range(len(trained)),
        key=lambda i: (trained[i][2].val_miou[0, 0], trained[i][2].val_acc[0, 0], -i),
    )
    label, names, head = trained[best]
    lr, wd = curve[best][1]["lr"], curve[best][1]["wd"]
    _, d = data.store.token_shape(names[0])
    config = {
        "lr": lr,
        "wd": wd,
        "epoch": int(head.epoch[0, 0]),
        "layers": [n.split("/")[0] for n in names],
        "batch_size": min(options.batch_size, len(data.fit_rows)),
        "optimizer": "adamw",
        "val_miou": float(head.val_miou[0, 0]),
        "val_pixel_acc": float(head.val_acc[0, 0]),
    }

    def confusions(split: str, rows: np.ndarray) -> np.ndarray:
        x = data.token_rows(split, names, rows, 0.5)
        m = torch.from_numpy(data.store.masks(split, rows))
        return head.confusions(x, m, n_classes, d, per_image=True)[0, 0].cpu().numpy()

    return DenseSelection("linseg", label, config, curve, confusions)
