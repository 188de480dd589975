"""Attentive probes on stored patch tokens (`extract --tokens`): learned queries attend over a
layer's tokens (multi-head cross-attention, as AIM, V-JEPA and DINOv3's video evaluation pool
frozen features), then a linear classifier. Every (layer, lr, wd) probe of the grid is trained
on the same minibatches in one batched pass, each keeping its best epoch on validation.

One probe, for tokens x (B, T, D) of one image batch:

    x' = LayerNorm(x)                                    (per token, no affine)
    q  = queries Wq + bq                                 (Q learned queries, `heads` heads)
    a  = softmax(q_h (x' + p) Wk_h^T / sqrt(D / heads))  over the T tokens (p: position term)
    o  = concat_h(a x' Wv_h + bv_h) Wo + bo              (B, Q, D)
    logits = mean over queries(o) Wc + bc

This is `torch.nn.MultiheadAttention(query=q, key=x' + p, value=x')` (its key bias drops out of
the softmax), computed associatively: each head's query is carried into the token space first
(Wk_h^T q_h), so the keys of B x T tokens are never projected and attending costs B T D per
query and head instead of B T D^2.

The position term p (T, D), learned (default) or none: cross-attention pooling is blind to the
tokens' order, and a CNN's map positions are carried only weakly by its features; a ViT's
tokens carry their position embedding already.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from probekit.defaults import ATTN_MIN_STEPS, DEFAULT_ATTN_LRS, DEFAULT_ATTN_WDS, DEFAULT_QUERIES
from probekit.probes.options import MethodOptions, option

if TYPE_CHECKING:
    import torch
    import torch.nn.functional as F

    from probekit.cache.store import FeatureStore
    from probekit.probes.base import ProbeData, Selection
    from probekit.probes.optim import GridAdamW
    from probekit.probes.rows import Rows
else:
    from probekit._lazy import LazyAttributes, lazy_module

    torch = lazy_module("torch")
    F = LazyAttributes("torch.nn.functional")

__all__ = ["AttentiveHeads", "Options", "default_heads", "select", "train_attentive_heads"]


@dataclass(frozen=True)
class Options(MethodOptions):
    """Attentive probes (on token arrays, `extract --tokens`): the AdamW lr x wd grid, learned
    queries, attention heads (default: width / 64) and the position term; epochs and batch
    size are the probe's shared ones."""

    shown = ("lr", "wd", "queries", "epoch")
    lrs: tuple[float, ...] = option(
        DEFAULT_ATTN_LRS,
        "Attentive: AdamW learning rates (comma list).",
        "numbers>0",
        flat="attn_lrs",
    )
    wds: tuple[float, ...] = option(
        DEFAULT_ATTN_WDS, "Attentive: weight decays (comma list).", "numbers>=0", flat="attn_wds"
    )
    queries: int = option(DEFAULT_QUERIES, "Attentive: learned queries.", "count")
    heads: int | None = option(
        None,
        "Attentive: attention heads [default: token width / 64].",
        "count?",
        flat="attn_heads",
    )
    position: Literal["learned", "none"] = option(
        "learned",
        "Attentive: learned (a learned position term on the keys) or none.",
        "choice",
        choices=("learned", "none"),
    )


# rows scored at once: at most this many bytes of float32 tokens per layer (the activations of
# a block are a few times this)
SCORE_BYTES = 16 * 2**20

# the weights each probe decays (AdamW, decoupled); biases are not decayed
DECAYED = ("query", "wq", "wk", "wv", "wo", "pos", "wc")


def default_heads(width: int) -> int:
    """Heads of width 64 (a ViT's), the most that divide `width` (at least 1)."""
    h = max(1, width // 64)
    while width % h:
        h -= 1
    return h


@dataclass
class AttentiveHeads:
    """L x H attentive probes (L layers of one token shape, H (lr, wd) configurations each).

    `params[name]` is (L, H, ...): query (Q, D), wq/wk/wv/wo (D, D), bq/bv/bo (D,), pos (T, D)
    (absent without a position term), wc (D, C), bc (C,). epoch/val_acc/val_loss: (L, H).
    """

    params: dict[str, torch.Tensor]
    heads: int
    epoch: np.ndarray
    val_acc: np.ndarray
    val_loss: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        l_, h_ = self.params["wc"].shape[:2]
        return int(l_), int(h_)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """(L, B, T, D) tokens -> (L, H, B, Q, D): every probe's attention-pooled outputs."""
        p = self.params
        n_layers, n_cfg = self.shape
        q_n, d = p["query"].shape[2:]
        nh = self.heads
        dh = d // nh
        xn = F.layer_norm(x, (d,))
        qp = torch.einsum("lhqd,lhed->lhqe", p["query"], p["wq"]) + p["bq"][:, :, None]
        qh = qp.view(n_layers, n_cfg, q_n, nh, dh)
        # each head's query in the token space: Wk_h^T q_h (the key bias drops out of softmax)
        u = torch.einsum("lhqnd,lhnde->lhqne", qh, p["wk"].view(n_layers, n_cfg, nh, dh, d))
        u = u * dh**-0.5
        s = torch.einsum("lbte,lhqne->lhbqnt", xn, u)
        if "pos" in p:
            s = s + torch.einsum("lhqne,lhte->lhqnt", u, p["pos"])[:, :, None]
        a = s.softmax(-1)
        pooled = torch.einsum("lhbqnt,lbte->lhbqne", a, xn)
        v = torch.einsum("lhbqne,lhnde->lhbqnd", pooled, p["wv"].view(n_layers, n_cfg, nh, dh, d))
        v = v + p["bv"].view(n_layers, n_cfg, 1, 1, nh, dh)
        v = v.reshape(*v.shape[:4], d)
        return torch.einsum("lhbqd,lhed->lhbqe", v, p["wo"]) + p["bo"][:, :, None, None]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(L, B, T, D) tokens -> (L, H, B, C)."""
        z = self.pooled(x).mean(3)
        return torch.einsum("lhbd,lhdc->lhbc", z, self.params["wc"]) + self.params["bc"][:, :, None]

    def one(self, layer: int, cfg: int) -> AttentiveHeads:
        """Probe (layer, cfg) alone, as a 1 x 1 grid (its tensors copied)."""
        params = {k: v[layer : layer + 1, cfg : cfg + 1].clone() for k, v in self.params.items()}
        keep = (slice(layer, layer + 1), slice(cfg, cfg + 1))
        return AttentiveHeads(
            params, self.heads, self.epoch[keep], self.val_acc[keep], self.val_loss[keep]
        )


def _init(
    n_layers: int,
    n_cfg: int,
    t: int,
    d: int,
    c: int,
    queries: int,
    position: bool,
    seed: int,
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """One probe's initial weights from `seed` (as torch.nn.MultiheadAttention initializes its
    projections: Xavier uniform, zero biases; queries and classifier N(0, 0.02)), copied to
    every probe of the grid: a probe's start does not depend on its place in the grid."""
    gen = torch.Generator().manual_seed(seed)
    bound = math.sqrt(6.0 / (2 * d))

    def uniform(*shape: int) -> torch.Tensor:
        return (torch.rand(*shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound

    one = {
        "query": torch.randn(queries, d, generator=gen, dtype=torch.float64) * 0.02,
        "wq": uniform(d, d),
        "bq": torch.zeros(d, dtype=torch.float64),
        "wk": uniform(d, d),
        "wv": uniform(d, d),
        "bv": torch.zeros(d, dtype=torch.float64),
        "wo": uniform(d, d),
        "bo": torch.zeros(d, dtype=torch.float64),
        "wc": torch.randn(d, c, generator=gen, dtype=torch.float64) * 0.02,
        "bc": torch.zeros(c, dtype=torch.float64),
    }
    if position:
        one["pos"] = torch.zeros(t, d, dtype=torch.float64)
    return {
        k: v.to(device, dtype).expand(n_layers, n_cfg, *v.shape).clone().requires_grad_(True)
        for k, v in one.items()
    }


def _tokens(xb: torch.Tensor, t: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    """(L, B, T*D) rows (as stored: float16) -> (L, B, T, D) in the compute dtype."""
    return xb.view(xb.shape[0], xb.shape[1], t, d).to(dtype)


def _autocast(device: torch.device) -> Any:
    import contextlib

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _scores(
    heads: AttentiveHeads, rows: Rows, y: torch.Tensor, t: int, d: int, dtype: torch.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """(accuracy, mean cross-entropy), each (L, H), of every probe on `rows` (in blocks of
    bounded activations)."""
    from probekit.probes.grid import classification_scores

    def logits_of(xb: torch.Tensor) -> torch.Tensor:
        with _autocast(rows.device):
            logits = heads.logits(_tokens(xb, t, d, dtype))
        return logits.float()

    blocks = _blocks(rows, _score_rows(t, d))
    return classification_scores(blocks, y, rows.n, heads.shape, logits_of)


def _score_rows(t: int, d: int) -> int:
    return max(1, SCORE_BYTES // (4 * t * d))


def _blocks(rows: Rows, size: int) -> Any:
    from probekit.probes.rows import Bounded

    return Bounded(rows, size).blocks()


class _Grid:
    """Attentive probes as a `GridModel`: autograd on the sum of every probe's mean
    cross-entropy (each gets its own gradient), AdamW by probe."""

    def __init__(
        self,
        heads: AttentiveHeads,
        opt: GridAdamW,
        token_shape: tuple[int, int],
        n_classes: int,
        dtype: torch.dtype,
    ):
        self.heads, self.opt, self.n_classes, self.dtype = heads, opt, n_classes, dtype
        self.t, self.d = token_shape

    def state(self) -> dict[str, torch.Tensor]:
        return self.heads.params

    def update(self, xb: torch.Tensor, yb: torch.Tensor, scale: float, step: int) -> None:
        params = self.heads.params
        with _autocast(xb.device):
            logits = self.heads.logits(_tokens(xb, self.t, self.d, self.dtype))
        n_layers, n_cfg = self.heads.shape
        loss = F.cross_entropy(
            logits.float().reshape(-1, self.n_classes),
            yb.repeat(n_layers * n_cfg),
            reduction="sum",
        ) / len(yb)
        self.opt.step(torch.autograd.grad(loss, list(params.values())), scale)

    def scores(self, rows: Rows, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        acc, loss = _scores(self.heads, rows, y, self.t, self.d, self.dtype)
        return acc, -loss


def train_attentive_heads(
    x: torch.Tensor | Rows,
    y: torch.Tensor,
    n_classes: int,
    token_shape: tuple[int, int],
    lrs: Sequence[float],
    wds: Sequence[float],
    *,
    queries: int = 1,
    heads: int | None = None,
    position: bool = True,
    epochs: int = 20,
    batch_size: int = 256,
    seed: int = 0,
    x_val: torch.Tensor | Rows | None = None,
    y_val: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    window: int | None = None,
) -> AttentiveHeads:
    """Train every (layer, lr, wd) attentive probe on the same minibatches (the grid trainer).

    x: (L, N, T*D) token rows of L layers of one token shape (T, D), or streamed `Rows`.
    AdamW (betas 0.9, 0.999, eps 1e-8, decoupled weight decay on the weights), a linear warmup
    over the first epoch (at most a tenth of the steps), then a cosine schedule. The loss is the
    sum of every probe's mean cross-entropy: probes never interact, so a batched probe equals
    the same probe trained alone (same seed). With a validation set, each probe keeps its
    weights of its best epoch (accuracy, then lower loss); without, its last.
    """
    from probekit.errors import OptionError
    from probekit.probes.grid import train_grid, warmup_cosine_schedule
    from probekit.probes.optim import GridAdamW
    from probekit.probes.rows import Rows

    dtype = torch.float32 if dtype is None else dtype
    rows = x if isinstance(x, Rows) else Rows.of(x)
    val = None if x_val is None else (x_val if isinstance(x_val, Rows) else Rows.of(x_val))
    t, d = token_shape
    n_layers, n = rows.layers, rows.n
    grid = [(lr, wd) for lr in lrs for wd in wds]
    n_cfg = len(grid)
    nh = heads or default_heads(d)
    if d % nh:
        raise OptionError(f"attn_heads {nh} does not divide the token width {d}.")
    params = _init(n_layers, n_cfg, t, d, n_classes, queries, position, seed, dtype, rows.device)
    state = AttentiveHeads(
        params,
        nh,
        np.full((n_layers, n_cfg), epochs),
        np.zeros((n_layers, n_cfg)),
        np.zeros((n_layers, n_cfg)),
    )
    opt = GridAdamW(params, [lr for lr, _ in grid], [wd for _, wd in grid], DECAYED)
    fit = train_grid(
        _Grid(state, opt, token_shape, n_classes, dtype),
        rows,
        y,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        schedule=warmup_cosine_schedule(max(1, math.ceil(n / batch_size))),
        val=val,
        y_val=y_val,
        window=window,
    )
    state.params = {k: v.detach() for k, v in params.items()}
    if val is not None:
        state.epoch, state.val_acc, state.val_loss = fit.epoch, fit.main, -fit.tie
    return state


def _train_groups(
    data: ProbeData, options: Options, batch: int
) -> tuple[Any, list[tuple[str, dict[str, Any], float]], bool]:
    """Every layer group's probes trained: (the best (score, (layer, probe, config index,
    token shape))), the layer-wise curve, whether rows were streamed)."""
    from probekit.probes.grid import best_head
    from probekit.probes.rows import token_rows

    store, shared = data.store, data.options
    grid = [(lr, wd) for lr in options.lrs for wd in options.wds]
    by_shape: dict[tuple[int, int], list[str]] = {}
    for name in data.token_names:
        by_shape.setdefault(store.token_shape(name), []).append(name)
    best: tuple[tuple[float, float], Any] = ((-1.0, 0.0), None)
    curve: list[tuple[str, dict[str, Any], float]] = []
    streamed = False
    share = data.fit_share
    fit_budget, val_budget = int(data.budget * share), int(data.budget * (1 - share))
    for shape, group in by_shape.items():
        fit_x = token_rows(store, "train", group, data.fit_rows, fit_budget, data.device)
        val_x = token_rows(store, data.val_split, group, data.val_rows, val_budget, data.device)
        streamed |= not fit_x.resident
        heads = train_attentive_heads(
            fit_x, data.fit_y, data.n_classes, shape, options.lrs, options.wds,
            queries=options.queries, heads=options.heads,
            position=options.position == "learned", epochs=shared.epochs, batch_size=batch,
            seed=shared.seed, x_val=val_x, y_val=data.val_y, dtype=shared.torch_dtype,
        )  # fmt: skip
        del fit_x, val_x
        for li, name in enumerate(group):
            _, hd = best_head(heads.val_acc[li : li + 1], -heads.val_loss[li : li + 1])
            curve.append((name, {"lr": grid[hd][0], "wd": grid[hd][1]}, heads.val_acc[li, hd]))
        li, hd = best_head(heads.val_acc, -heads.val_loss)
        score = (float(heads.val_acc[li, hd]), float(-heads.val_loss[li, hd]))
        if score > best[0]:
            best = (score, (group[li], heads.one(li, hd), hd, shape))
    return best, curve, streamed


def select(data: ProbeData, options: Options) -> Selection:
    """Every (layer, lr, wd) attentive probe trained together (layers of one token shape as one
    stack), epoch and probe chosen on validation accuracy, then the lower validation loss."""
    from probekit.probes.base import Feature, Selection
    from probekit.probes.rows import Bounded, token_rows

    store, shared = data.store, data.options
    grid = [(lr, wd) for lr in options.lrs for wd in options.wds]
    dtype = shared.torch_dtype
    # a small train split still gets ATTN_MIN_STEPS AdamW steps an epoch
    batch = min(shared.batch_size, max(16, len(data.fit_rows) // ATTN_MIN_STEPS))
    best, curve, streamed = _train_groups(data, options, batch)
    if best[1] is None:  # no head had a finite validation loss
        from probekit.probes.grid import diverged

        diverged("attentive probe", float("nan"), grid)
    assert best[1] is not None
    name, chosen, hd, (t, d) = best[1]
    config: dict[str, Any] = {
        "feature": name,
        "lr": grid[hd][0],
        "wd": grid[hd][1],
        "epoch": int(chosen.epoch[0, 0]),
        "epochs": shared.epochs,
        "batch_size": batch,
        "queries": options.queries,
        "attn_heads": chosen.heads,
        "position": options.position,
        "tokens": t,
        "optimizer": "adamw",
        "heads": len(grid) * len(data.token_names),
        "val_top1": best[0][0],
    }
    if streamed:
        config["features_streamed"] = True

    def scorer(xb: torch.Tensor) -> torch.Tensor:
        with _autocast(data.device):
            logits: torch.Tensor = chosen.logits(_tokens(xb, t, d, dtype))[0, 0]
            return logits.float()

    def reader(st: FeatureStore, split: str, rows: np.ndarray, budget: int) -> Rows:
        return Bounded(token_rows(st, split, [name], rows, budget, data.device), _score_rows(t, d))

    feature = Feature(name, torch.zeros(0), torch.ones(0))
    return Selection(
        "attentive",
        feature,
        None,
        None,
        config,
        curve,
        lambda: reader(store, "train", data.fit_rows, data.budget),
        data.fit_y,
        scorer,
        reader,
    )
