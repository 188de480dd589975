"""MLP probes: one hidden layer (GELU) on a standardized pooled feature, every (feature, lr, wd)
head of one hidden width trained together on the grid trainer (AdamW, warmup then cosine), the
lr x wd x width grid chosen on validation accuracy (then the lower validation loss).

One head, for rows x (B, D):

    h = GELU(x W1 + b1)       (B, width)
    logits = h W2 + b2        (B, C)

W1, W2 start as `torch.nn.Linear` starts them (uniform in +-1/sqrt(fan in), seeded, the same
for every head); AdamW decays W1 and W2, not the biases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from probekit.probes.options import MethodOptions, option

if TYPE_CHECKING:
    import torch
    import torch.nn.functional as F

    from probekit.probes.base import ProbeData, Selection
    from probekit.probes.optim import GridAdamW
    from probekit.probes.rows import Rows
else:
    from probekit._lazy import LazyAttributes, lazy_module

    torch = lazy_module("torch")
    F = LazyAttributes("torch.nn.functional")

__all__ = ["MlpHeads", "Options", "select", "train_mlp_heads"]


@dataclass(frozen=True)
class Options(MethodOptions):
    """MLP probes: the AdamW lr x wd x hidden width grid; epochs and batch size are the probe's
    shared ones."""

    shown = ("lr", "wd", "width", "epoch")
    lrs: tuple[float, ...] = option(
        (3e-4, 1e-3, 3e-3), "MLP: AdamW learning rates (comma list).", "numbers>0", flat="mlp_lrs"
    )
    wds: tuple[float, ...] = option(
        (1e-4, 1e-2), "MLP: weight decays (comma list).", "numbers>=0", flat="mlp_wds"
    )
    widths: tuple[int, ...] = option(
        (256, 1024), "MLP: hidden widths (comma list).", "ints>0", flat="mlp_widths"
    )


@dataclass
class MlpHeads:
    """L x G one-hidden-layer heads (L features of one width, G (lr, wd) configurations):
    `params` w1 (L, G, D, W), b1 (L, G, W), w2 (L, G, W, C), b2 (L, G, C)."""

    params: dict[str, torch.Tensor]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(L, B, D) rows -> (L, G, B, C) logits of every head."""
        p = self.params
        h = F.gelu(torch.einsum("lbd,lgdw->lgbw", x, p["w1"]) + p["b1"][:, :, None])
        out: torch.Tensor = torch.einsum("lgbw,lgwc->lgbc", h, p["w2"]) + p["b2"][:, :, None]
        return out

    def one(self, feature: int, cfg: int) -> MlpHeads:
        return MlpHeads(
            {k: v[feature : feature + 1, cfg : cfg + 1] for k, v in self.params.items()}
        )


def _init(
    n_feat: int, n_cfg: int, d: int, width: int, n_classes: int, seed: int, like: torch.Tensor
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def uniform(fan_in: int, *shape: int) -> torch.Tensor:
        one = (torch.rand(*shape, generator=gen, dtype=torch.float64) * 2 - 1) / math.sqrt(fan_in)
        return one.to(like).expand(n_feat, n_cfg, *shape).clone().requires_grad_(True)

    return {
        "w1": uniform(d, d, width),
        "b1": uniform(d, width),
        "w2": uniform(width, width, n_classes),
        "b2": uniform(width, n_classes),
    }


class _Grid:
    """MLP heads as a `GridModel`: autograd on the sum of every head's mean cross-entropy."""

    def __init__(self, heads: MlpHeads, opt: GridAdamW, n_classes: int):
        self.heads, self.opt, self.n_classes = heads, opt, n_classes

    def state(self) -> dict[str, torch.Tensor]:
        return self.heads.params

    def update(self, xb: torch.Tensor, yb: torch.Tensor, scale: float, step: int) -> None:
        logits = self.heads.logits(xb)  # (L, G, B, C)
        n = logits.shape[0] * logits.shape[1]
        loss = F.cross_entropy(
            logits.reshape(-1, self.n_classes), yb.repeat(n), reduction="sum"
        ) / len(yb)
        self.opt.step(torch.autograd.grad(loss, list(self.heads.params.values())), scale)

    def scores(self, rows: Rows, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(accuracy, minus the mean cross-entropy), each (L, G)."""
        from probekit.probes.grid import classification_scores

        n_feat, n_cfg = self.heads.params["b2"].shape[:2]
        shape = (int(n_feat), int(n_cfg))
        acc, loss = classification_scores(rows.blocks(), y, rows.n, shape, self.heads.logits)
        return acc, -loss


def train_mlp_heads(
    rows: Rows,
    y: torch.Tensor,
    n_classes: int,
    width: int,
    lrs: tuple[float, ...],
    wds: tuple[float, ...],
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    val: Rows | None = None,
    y_val: torch.Tensor | None = None,
) -> tuple[MlpHeads, Any]:
    """Every (feature, lr, wd) head of one hidden `width` on the grid trainer: the heads (each
    at its best epoch on validation) and the trainer's `GridFit`."""
    from probekit.probes.grid import train_grid, warmup_cosine_schedule
    from probekit.probes.optim import GridAdamW

    grid = [(lr, wd) for lr in lrs for wd in wds]
    like = torch.zeros((), dtype=rows.dtype, device=rows.device)
    params = _init(rows.layers, len(grid), rows.width, width, n_classes, seed, like)
    heads = MlpHeads(params)
    opt = GridAdamW(params, [lr for lr, _ in grid], [wd for _, wd in grid], ("w1", "w2"))
    fit = train_grid(
        _Grid(heads, opt, n_classes),
        rows,
        y,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        schedule=warmup_cosine_schedule(max(1, math.ceil(rows.n / batch_size))),
        val=val,
        y_val=y_val,
    )
    heads.params = {k: v.detach() for k, v in params.items()}
    return heads, fit


def select(data: ProbeData, options: Options) -> Selection:
    """Every (feature, lr, wd) head of each width trained together (features of one width as
    one stack); the head of the best validation accuracy (then loss) is chosen."""
    from probekit.probes.base import Selection
    from probekit.probes.grid import best_head

    shared = data.options
    grid = [(lr, wd) for lr in options.lrs for wd in options.wds]
    by_dim: dict[int, list[str]] = {}
    for name in data.names:
        by_dim.setdefault(int(data.feats[name].mean.shape[0]), []).append(name)
    best: tuple[tuple[float, float], Any] = ((-1.0, -math.inf), None)
    per_feature: dict[str, tuple[tuple[float, float], dict[str, Any]]] = {}
    batch = min(shared.batch_size, len(data.fit_rows))
    for group in by_dim.values():
        fit_x, val_x = data.fit(group, data.fit_share), data.val(group, 1 - data.fit_share)
        for width in options.widths:
            heads, fit = train_mlp_heads(
                fit_x, data.fit_y, data.n_classes, width, options.lrs, options.wds,
                epochs=shared.epochs, batch_size=batch, seed=shared.seed,
                val=val_x, y_val=data.val_y,
            )  # fmt: skip
            for li, name in enumerate(group):
                _, g = best_head(fit.main[li : li + 1], fit.tie[li : li + 1])
                score = (float(fit.main[li, g]), float(fit.tie[li, g]))
                cfg = {"lr": grid[g][0], "wd": grid[g][1], "width": width}
                cfg["epoch"] = int(fit.epoch[li, g])
                if name not in per_feature or score > per_feature[name][0]:
                    per_feature[name] = (score, cfg)
                if score > best[0]:
                    best = (score, (name, heads.one(li, g), cfg))
        del fit_x, val_x
    if best[1] is None:  # no head had a finite validation loss
        from probekit.probes.grid import diverged

        diverged("MLP probe", float("nan"), grid)
    assert best[1] is not None
    name, chosen, cfg = best[1]
    config: dict[str, Any] = {
        "feature": name,
        **cfg,
        "epochs": shared.epochs,
        "batch_size": batch,
        "optimizer": "adamw",
        "heads": len(grid) * len(options.widths) * len(data.names),
        "val_top1": best[0][0],
    }
    curve = [(n, c, s[0]) for n, (s, c) in per_feature.items()]

    def scorer(xb: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = chosen.logits(xb)[0, 0]
        return logits

    return Selection(
        "mlp", data.feats[name], None, None, config, curve,
        lambda: data.fit([name]), data.fit_y, scorer,
    )  # fmt: skip
