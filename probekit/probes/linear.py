"""Batched linear heads (DINOv2's linear protocol): every (feature, lr, wd) head trained on the
same minibatches in one batched matmul, each keeping its best epoch on validation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np

from probekit.defaults import DEFAULT_LRS, DEFAULT_WDS
from probekit.probes.options import MethodOptions, option

if TYPE_CHECKING:
    import torch

    from probekit.probes.base import ProbeData, Selection
    from probekit.probes.rows import Rows
else:
    from probekit._lazy import lazy_module

    torch = lazy_module("torch")

__all__ = ["LinearHeads", "Options", "minibatches", "select", "train_linear_heads"]


@dataclass(frozen=True)
class Options(MethodOptions):
    """Linear heads: the lr x wd grid (lrs scaled by batch_size / 256) and the optimizer;
    epochs and batch size are the probe's shared ones."""

    shown = ("lr", "wd", "epoch", "optimizer")
    lrs: tuple[float, ...] = option(DEFAULT_LRS, "Linear heads: learning rates.", "numbers>0")
    wds: tuple[float, ...] = option(DEFAULT_WDS, "Linear heads: weight decays.", "numbers>=0")
    optimizer: Literal["sgd", "adamw"] = option(
        "sgd", "Linear heads: sgd or adamw.", "choice", choices=("sgd", "adamw")
    )


def minibatches(*args: Any, **kwargs: Any) -> Any:
    """`probekit.probes.grid.minibatches`."""
    from probekit.probes.grid import minibatches as batches

    return batches(*args, **kwargs)


@dataclass
class LinearHeads:
    """Linear heads for L features of one width, H (lr, wd) heads each, trained together.

    weight (L, D, H, C) (so that all heads of a feature are one (D, H*C) matrix), bias
    (L, H, C); `epoch[l, h]` is the epoch (1-based) each head's weights come from,
    `val_acc`/`val_loss` (L, H) its validation scores then.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    epoch: np.ndarray
    val_acc: np.ndarray
    val_loss: np.ndarray

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(L, B, D) -> (L, B, H, C): one batched matmul for every feature and head."""
        n_feat, d, h, c = self.weight.shape
        flat = torch.baddbmm(
            self.bias.view(n_feat, 1, h * c), x, self.weight.view(n_feat, d, h * c)
        )
        return flat.view(n_feat, -1, h, c)


def _softmax_minus_onehot(heads: LinearHeads, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    """(L, B, H, C) softmax of every head's logits minus the one-hot labels: B times the
    gradient of the batch's mean cross-entropy with respect to the logits."""
    logits = heads.logits(xb)
    logits -= logits.amax(-1, keepdim=True)
    p = logits.exp_()
    p /= p.sum(-1, keepdim=True)
    p[:, torch.arange(len(yb), device=yb.device), :, yb] -= 1.0
    return p


def _head_scores(heads: LinearHeads, rows: Rows, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(accuracy, mean cross-entropy), each (L, H), of every head on `rows`."""
    from probekit.probes.rows import log_softmax_

    correct = torch.zeros(heads.val_acc.shape, dtype=torch.int64, device=rows.device)
    loss = torch.zeros(heads.val_acc.shape, dtype=torch.float64, device=rows.device)
    start = 0
    for xb in rows.blocks():
        yb = y[start : start + xb.shape[1]]
        start += xb.shape[1]
        log_p = log_softmax_(heads.logits(xb))  # (L, b, H, C)
        correct += (log_p.argmax(-1) == yb[None, :, None]).sum(1)
        index = yb[None, :, None, None].expand(*log_p.shape[:3], 1)
        loss -= log_p.gather(-1, index)[..., 0].sum(1, dtype=torch.float64)
    return (correct.double() / rows.n).cpu().numpy(), (loss / rows.n).cpu().numpy()


class _Step(NamedTuple):
    """One minibatch's update, for every head at once: the batch, its softmax minus one-hot,
    1 / batch size, the scheduled learning rates (weights, biases), weight decays (or None)."""

    xb: torch.Tensor  # (L, B, D)
    p: torch.Tensor  # (L, B, H, C)
    inv_b: float
    lrs: tuple[torch.Tensor, torch.Tensor]
    wd: torch.Tensor | None
    step: int  # 1-based


def _sgd_step(heads: LinearHeads, m1: list[torch.Tensor], _: list[torch.Tensor], s: _Step) -> None:
    """SGD with momentum 0.9: m = 0.9 m + grad (+ wd W); W -= lr m; no decay on biases. The
    weight gradient goes straight into the momentum (one fused batched matmul)."""
    n_feat, d, h, c = heads.weight.shape
    m1[0].view(n_feat, d, h * c).baddbmm_(
        s.xb.transpose(1, 2), s.p.view(n_feat, -1, h * c), beta=0.9, alpha=s.inv_b
    )
    m1[1].mul_(0.9).add_(s.p.sum(1), alpha=s.inv_b)
    if s.wd is not None:
        m1[0].addcmul_(heads.weight, s.wd.view(1, 1, h, 1))
    heads.weight.addcmul_(m1[0], s.lrs[0], value=-1.0)
    heads.bias.addcmul_(m1[1], s.lrs[1], value=-1.0)


def _adamw_step(
    heads: LinearHeads, m1: list[torch.Tensor], m2: list[torch.Tensor], s: _Step
) -> None:
    """AdamW (betas 0.9, 0.999, eps 1e-8) with decoupled weight decay."""
    n_feat, _, h, c = heads.weight.shape
    g_w = torch.bmm(s.xb.transpose(1, 2), s.p.view(n_feat, -1, h * c))
    grads = (g_w.view(heads.weight.shape).mul_(s.inv_b), s.p.sum(1).mul_(s.inv_b))
    params = (heads.weight, heads.bias)
    for i, (param, g, lr) in enumerate(zip(params, grads, s.lrs, strict=True)):
        m1[i].mul_(0.9).add_(g, alpha=0.1)
        m2[i].mul_(0.999).addcmul_(g, g, value=0.001)
        m_hat, v_hat = m1[i] / (1 - 0.9**s.step), m2[i] / (1 - 0.999**s.step)
        if i == 0 and s.wd is not None:
            param.mul_(1 - lr * s.wd.view(1, 1, h, 1))
        param.sub_(lr * m_hat / (v_hat.sqrt() + 1e-8))


class _Grid:
    """Linear heads as a `GridModel`: SGD (momentum 0.9) or AdamW on the closed-form
    gradient of every head's mean cross-entropy (one batched matmul a batch)."""

    def __init__(
        self, heads: LinearHeads, grid: list[tuple[float, float]], optimizer: str, batch_size: int
    ):
        opts: dict[str, Any] = {"dtype": heads.weight.dtype, "device": heads.weight.device}
        self.heads, self.h = heads, len(grid)
        self.lr0 = torch.tensor([lr * batch_size / 256 for lr, _ in grid], **opts)
        self.wd0 = torch.tensor([wd for _, wd in grid], **opts)
        self.decay = bool((self.wd0 != 0).any())
        params = [heads.weight, heads.bias]
        self.m1 = [torch.zeros_like(p) for p in params]  # momentum (SGD), first moments (AdamW)
        self.m2 = [torch.zeros_like(p) for p in params]  # second moments (AdamW)
        self.rule = _sgd_step if optimizer == "sgd" else _adamw_step

    def state(self) -> dict[str, torch.Tensor]:
        return {"weight": self.heads.weight.transpose(1, 2), "bias": self.heads.bias}

    def update(self, xb: torch.Tensor, yb: torch.Tensor, scale: float, step: int) -> None:
        h = self.h
        p = _softmax_minus_onehot(self.heads, xb, yb)
        lr_w, lr_b = (self.lr0 * scale).view(1, 1, h, 1), (self.lr0 * scale).view(1, h, 1)
        wd = self.wd0 if self.decay else None
        self.rule(self.heads, self.m1, self.m2, _Step(xb, p, 1.0 / len(yb), (lr_w, lr_b), wd, step))

    def scores(self, rows: Rows, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        acc, loss = _head_scores(self.heads, rows, y)
        return acc, -loss


def train_linear_heads(
    x: torch.Tensor | Rows,
    y: torch.Tensor,
    n_classes: int,
    lrs: Sequence[float],
    wds: Sequence[float],
    *,
    epochs: int = 20,
    batch_size: int = 256,
    optimizer: Literal["sgd", "adamw"] = "sgd",
    seed: int = 0,
    x_val: torch.Tensor | Rows | None = None,
    y_val: torch.Tensor | None = None,
    window: int | None = None,
) -> LinearHeads:
    """Train every (lr, wd) head of every feature on the same minibatches (the grid trainer).

    x: (N, D) or (L, N, D), L features of one width for the same rows, or streamed `Rows`.
    SGD with momentum 0.9 or AdamW, cosine schedule, lr scaled by batch_size / 256 (DINOv2).
    With a validation set, each head keeps its weights from its best epoch (accuracy, then
    lower loss); without, its last. Heads never interact: each update uses only that head's
    own gradient, so a batched head equals the same head trained alone. `window`: rows loaded
    at once (default: all when in memory, else the budget's block); a smaller window shuffles
    within windows of blocks and gives the same heads in memory and streamed.
    """
    from probekit.probes.grid import train_grid
    from probekit.probes.rows import Rows

    rows = x if isinstance(x, Rows) else Rows.of(x)
    val = None if x_val is None else (x_val if isinstance(x_val, Rows) else Rows.of(x_val))
    n_feat, d = rows.layers, rows.width
    grid = [(lr, wd) for lr in lrs for wd in wds]
    h = len(grid)
    opts: dict[str, Any] = {"dtype": rows.dtype, "device": rows.device}
    # zero init: the problem is convex and a head's start does not depend on its neighbours
    heads = LinearHeads(
        torch.zeros(n_feat, d, h, n_classes, **opts),
        torch.zeros(n_feat, h, n_classes, **opts),
        np.full((n_feat, h), epochs),
        np.zeros((n_feat, h)),
        np.zeros((n_feat, h)),
    )
    model = _Grid(heads, grid, optimizer, batch_size)
    fit = train_grid(
        model,
        rows,
        y,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        val=val,
        y_val=y_val,
        window=window,
    )
    if val is not None:
        heads.epoch, heads.val_acc, heads.val_loss = fit.epoch, fit.main, -fit.tie
    return heads


def select(data: ProbeData, options: Options) -> Selection:
    """Every (feature, lr, wd) head trained together (features of one width as one stack),
    epoch and head chosen on validation accuracy, then the lower validation loss."""
    from probekit.probes.base import Selection
    from probekit.probes.grid import best_head

    shared = data.options
    grid = [(lr, wd) for lr in options.lrs for wd in options.wds]
    by_width: dict[int, list[str]] = {}
    for name in data.names:  # features of one width train as one stack: one matmul per batch
        by_width.setdefault(int(data.feats[name].mean.shape[0]), []).append(name)
    best: tuple[tuple[float, float], Any] = ((-1.0, 0.0), None)
    curve: list[tuple[str, dict[str, Any], float]] = []
    streamed = False
    for group in by_width.values():
        fit_x, val_x = data.fit(group, data.fit_share), data.val(group, 1 - data.fit_share)
        streamed |= not fit_x.resident
        heads = train_linear_heads(
            fit_x,
            data.fit_y,
            data.n_classes,
            options.lrs,
            options.wds,
            epochs=shared.epochs,
            batch_size=shared.batch_size,
            optimizer=options.optimizer,
            seed=shared.seed,
            x_val=val_x,
            y_val=data.val_y,
        )
        del fit_x, val_x
        for li, name in enumerate(group):  # each feature's best head: the layer-wise curve
            _, hd = best_head(heads.val_acc[li : li + 1], -heads.val_loss[li : li + 1])
            curve.append((name, {"lr": grid[hd][0], "wd": grid[hd][1]}, heads.val_acc[li, hd]))
        li, hd = best_head(heads.val_acc, -heads.val_loss)
        score = (float(heads.val_acc[li, hd]), float(-heads.val_loss[li, hd]))
        if score > best[0]:
            w, b = heads.weight[li, :, hd].T.clone(), heads.bias[li, hd].clone()
            best = (score, (group[li], w, b, int(heads.epoch[li, hd]), hd))
    if best[1] is None:  # no head had a finite validation loss
        from probekit.probes.grid import diverged

        diverged("linear probe", float("nan"), grid)
    assert best[1] is not None
    name, w, b, epoch, hd = best[1]
    config: dict[str, Any] = {
        "feature": name,
        "lr": grid[hd][0],
        "wd": grid[hd][1],
        "epoch": epoch,
        "epochs": shared.epochs,
        "batch_size": shared.batch_size,
        "optimizer": options.optimizer,
        "heads": len(grid) * len(data.names),
        "val_top1": best[0][0],
    }
    if streamed:
        config["features_streamed"] = True
    feature = data.feats[name]
    return Selection("linear", feature, w, b, config, curve, lambda: data.fit([name]), data.fit_y)
