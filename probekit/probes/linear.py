"""Batched linear heads (DINOv2's linear protocol): every (feature, lr, wd) head trained on the
same minibatches in one batched matmul, each keeping its best epoch on validation."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from probekit.probes.base import ProbeData, ProbeOptions, Selection
from probekit.probes.rows import Rows, gather, log_softmax_

__all__ = ["LinearHeads", "minibatches", "select", "train_linear_heads"]


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


def minibatches(
    rows: Rows, y: torch.Tensor, batch_size: int, window: int, gen: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of minibatches. With every row in memory, a plain shuffle; otherwise a
    windowed one: blocks of consecutive rows (a 64th of a window, at least 16 rows) in random
    order, `window` rows loaded at a time and shuffled, a batch that straddles two windows
    completed from the next."""
    n = rows.n
    if window >= n:
        windows = [(np.arange(n), torch.randperm(n, generator=gen))]
    else:
        # many small blocks a window: rows stored sorted by class still mix in every batch
        block = max(1, window // 64, min(window, 16))
        starts = torch.randperm(math.ceil(n / block), generator=gen).numpy() * block
        per = max(1, window // block)
        windows = []
        for i in range(0, len(starts), per):
            pos = np.sort(
                np.concatenate([np.arange(s, min(s + block, n)) for s in starts[i : i + per]])
            )
            windows.append((pos, torch.randperm(len(pos), generator=gen)))
    carry: tuple[torch.Tensor, torch.Tensor] | None = None
    for pos, perm in windows:
        data = rows.data if rows.data is not None and len(pos) == n else rows.take(pos)
        y_win = y[torch.from_numpy(pos).to(y.device)]
        perm = perm.to(rows.device)
        start = 0
        if carry is not None:
            idx = perm[: batch_size - len(carry[1])]
            carry = (
                torch.cat([carry[0], gather(data, idx)], 1),
                torch.cat([carry[1], y_win[idx]]),
            )
            start = len(idx)
            if len(carry[1]) < batch_size:
                continue
            yield carry
            carry = None
        for s in range(start, len(perm), batch_size):
            idx = perm[s : s + batch_size]
            if len(idx) < batch_size:
                carry = (gather(data, idx), y_win[idx])
                break
            yield gather(data, idx), y_win[idx]
        del data  # one window held at a time: the next is read after this one is let go
    if carry is not None:
        yield carry


def _head_scores(heads: LinearHeads, rows: Rows, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(accuracy, mean cross-entropy), each (L, H), of every head on `rows`."""
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
    """Train every (lr, wd) head of every feature on the same minibatches.

    x: (N, D) or (L, N, D), L features of one width for the same rows, or streamed `Rows`.
    SGD with momentum 0.9 or AdamW, cosine schedule, lr scaled by batch_size / 256 (DINOv2).
    With a validation set, each head keeps its weights from its best epoch (accuracy, then
    lower loss); without, its last. Heads never interact: each update uses only that head's
    own gradient, so a batched head equals the same head trained alone. `window`: rows loaded
    at once (default: all when in memory, else the budget's block); a smaller window shuffles
    within windows of blocks and gives the same heads in memory and streamed.
    """
    rows = x if isinstance(x, Rows) else Rows.of(x)
    val = None if x_val is None else (x_val if isinstance(x_val, Rows) else Rows.of(x_val))
    n_feat, n, d = rows.layers, rows.n, rows.width
    window = (n if rows.resident else rows.block) if window is None else window
    grid = [(lr, wd) for lr in lrs for wd in wds]
    h = len(grid)
    gen = torch.Generator().manual_seed(seed)
    opts: dict[str, Any] = {"dtype": rows.dtype, "device": rows.device}
    # zero init: the problem is convex and a head's start does not depend on its neighbours
    heads = LinearHeads(
        torch.zeros(n_feat, d, h, n_classes, **opts),
        torch.zeros(n_feat, h, n_classes, **opts),
        np.full((n_feat, h), epochs),
        np.zeros((n_feat, h)),
        np.zeros((n_feat, h)),
    )
    best = LinearHeads(
        heads.weight.clone(),
        heads.bias.clone(),
        np.zeros((n_feat, h), int),
        np.full((n_feat, h), -1.0),
        np.full((n_feat, h), np.inf),
    )
    lr0 = torch.tensor([lr * batch_size / 256 for lr, _ in grid], **opts)
    wd0 = torch.tensor([wd for _, wd in grid], **opts)
    params = [heads.weight, heads.bias]
    m1 = [torch.zeros_like(p) for p in params]  # momentum (SGD), first moments (AdamW)
    m2 = [torch.zeros_like(p) for p in params]  # second moments (AdamW)
    steps = max(1, math.ceil(n / batch_size))
    total, step = epochs * steps, 0
    decay = bool((wd0 != 0).any())
    for epoch in range(epochs):
        for xb, yb in minibatches(rows, y, batch_size, window, gen):
            p = _softmax_minus_onehot(heads, xb, yb)
            inv_b = 1.0 / len(yb)  # mean over the batch
            scale = 0.5 * (1 + math.cos(math.pi * step / total))  # cosine schedule
            step += 1
            lr_w, lr_b = (lr0 * scale).view(1, 1, h, 1), (lr0 * scale).view(1, h, 1)
            update = _sgd_step if optimizer == "sgd" else _adamw_step
            update(heads, m1, m2, _Step(xb, p, inv_b, (lr_w, lr_b), wd0 if decay else None, step))
        if val is not None and y_val is not None:
            acc, loss = _head_scores(heads, val, y_val)
            better = (acc > best.val_acc) | ((acc == best.val_acc) & (loss < best.val_loss))
            if better.any():
                mask = torch.from_numpy(better).to(rows.device)
                best.weight.transpose(1, 2)[mask] = heads.weight.transpose(1, 2)[mask]
                best.bias[mask] = heads.bias[mask]
                best.epoch[better], best.val_acc[better] = epoch + 1, acc[better]
                best.val_loss[better] = loss[better]
    return best if val is not None else heads


def select(data: ProbeData, options: ProbeOptions) -> Selection:
    """Every (feature, lr, wd) head trained together (features of one width as one stack),
    epoch and head chosen on validation accuracy, then the lower validation loss."""
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
            epochs=options.epochs,
            batch_size=options.batch_size,
            optimizer=options.optimizer,
            seed=options.seed,
            x_val=val_x,
            y_val=data.val_y,
        )
        del fit_x, val_x
        for li, name in enumerate(group):  # each feature's best head: the layer-wise curve
            hd = int(np.lexsort((heads.val_loss[li], -heads.val_acc[li]))[0])
            curve.append((name, {"lr": grid[hd][0], "wd": grid[hd][1]}, heads.val_acc[li, hd]))
        # best accuracy; among equals, the lowest validation loss
        flat = np.lexsort((heads.val_loss.ravel(), -heads.val_acc.ravel()))[0]
        li, hd = (int(v) for v in np.unravel_index(int(flat), heads.val_acc.shape))
        score = (float(heads.val_acc[li, hd]), float(-heads.val_loss[li, hd]))
        if score > best[0]:
            w, b = heads.weight[li, :, hd].T.clone(), heads.bias[li, hd].clone()
            best = (score, (group[li], w, b, int(heads.epoch[li, hd]), hd))
    assert best[1] is not None
    name, w, b, epoch, hd = best[1]
    config: dict[str, Any] = {
        "feature": name,
        "lr": grid[hd][0],
        "wd": grid[hd][1],
        "epoch": epoch,
        "epochs": options.epochs,
        "batch_size": options.batch_size,
        "optimizer": options.optimizer,
        "heads": len(grid) * len(data.names),
        "val_top1": best[0][0],
    }
    if streamed:
        config["features_streamed"] = True
    feature = data.feats[name]
    return Selection("linear", feature, w, b, config, curve, lambda: data.fit([name]), data.fit_y)
