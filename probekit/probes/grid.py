"""The one grid trainer: any batch of heads (L features x G configurations, each head its own
parameters) trained over minibatches of cached rows, resident or streamed within a memory
budget, with one schedule and one rule for the best epoch and the best head on validation.

A method gives a `GridModel`: its parameters as (L, G, ...) views (`state`), one update of
every head on a minibatch (`update`), and every head's validation scores (`scores`: a main
score and a tie-breaker, higher better for both). Linear heads, attentive probes, linear
segmentation and the MLP probe train here; few-shot episodes are rows of L (the heads' feature
axis). dinov2's `AllClassifiers` is the model: one loop, every head, one selection.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from probekit.probes.rows import Rows, gather

__all__ = [
    "GridFit",
    "GridModel",
    "best_head",
    "classification_scores",
    "cosine",
    "diverged",
    "minibatches",
    "train_grid",
    "warmup_cosine_schedule",
]


class GridModel(Protocol):
    """L x G heads trained together."""

    def state(self) -> dict[str, torch.Tensor]:
        """Every tensor a head owns, as (L, G, ...) views (copied into and out of by head)."""
        ...

    def update(self, xb: torch.Tensor, yb: torch.Tensor, scale: float, step: int) -> None:
        """One step of every head on a minibatch ((L, B, ...) rows, (B, ...) targets), the
        learning rates times `scale`; `step` is 1-based."""
        ...

    def scores(self, rows: Rows, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(main, tie-breaker) scores of every head on `rows`, each (L, G), higher better."""
        ...


# a schedule: (step (1-based), total steps) -> the learning rates' factor
Schedule = Callable[[int, int], float]


def cosine(step: int, total: int) -> float:
    """A cosine from 1 at the first step to 0 at `total` (DINOv2's linear heads)."""
    return 0.5 * (1 + math.cos(math.pi * (step - 1) / total))


def warmup_cosine_schedule(steps_per_epoch: int) -> Schedule:
    """A linear warmup over the first epoch (at most a tenth of the steps), then a cosine."""
    from probekit.probes.optim import warmup_cosine

    def schedule(step: int, total: int) -> float:
        return warmup_cosine(step, max(1, min(steps_per_epoch, total // 10)), total)

    return schedule


@dataclass
class GridFit:
    """What the trainer kept of every head (each (L, G)): the epoch its weights are from
    (1-based) and its validation scores then (NaN without validation rows)."""

    epoch: np.ndarray
    main: np.ndarray
    tie: np.ndarray


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


def train_grid(
    model: GridModel,
    rows: Rows,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    schedule: Schedule = cosine,
    val: Rows | None = None,
    y_val: torch.Tensor | None = None,
    window: int | None = None,
) -> GridFit:
    """Train every head of `model` for `epochs` over the same minibatches of `rows`.

    With validation rows, every head is scored after each epoch and keeps its weights of its
    best epoch (main score, then the tie-breaker; the earlier epoch among equals), which the
    model holds on return; without, its last. `window`: rows loaded at once (default: all
    when resident, else the budget's block).
    """
    n = rows.n
    window = (n if rows.resident else rows.block) if window is None else window
    gen = torch.Generator().manual_seed(seed)
    state = model.state()
    shape = next(iter(state.values())).shape[:2]
    fit = GridFit(np.full(shape, epochs), np.full(shape, np.nan), np.full(shape, np.nan))
    best: dict[str, torch.Tensor] = {}
    if val is not None and y_val is not None:
        best = {k: v.detach().clone() for k, v in state.items()}
        fit = GridFit(np.zeros(shape, int), np.full(shape, -np.inf), np.full(shape, -np.inf))
    total = epochs * max(1, math.ceil(n / batch_size))
    step = 0
    for epoch in range(epochs):
        for xb, yb in minibatches(rows, y, batch_size, window, gen):
            step += 1
            model.update(xb, yb, schedule(step, total), step)
        if best:
            assert val is not None and y_val is not None
            main, tie = model.scores(val, y_val)
            # a head whose loss is not finite has diverged: never kept (its accuracy is
            # argmax of NaN logits)
            finite = np.isfinite(main) & np.isfinite(tie)
            better = (main > fit.main) | ((main == fit.main) & (tie > fit.tie))
            better &= finite
            if better.any():
                mask = torch.from_numpy(better).to(rows.device)
                for k, v in state.items():
                    best[k][mask] = v.detach()[mask]
                fit.epoch[better], fit.main[better], fit.tie[better] = (
                    epoch + 1,
                    main[better],
                    tie[better],
                )
    with torch.no_grad():
        for k, v in best.items():
            state[k].copy_(v)
    return fit


def diverged(what: str, main: float, grid: Sequence[Any]) -> None:
    """A one-line error where the chosen head's score is not finite: every head diverged."""
    if not np.isfinite(main):
        from probekit.errors import ProbekitError

        raise ProbekitError(
            f"the {what} diverged at every configuration of its grid ({len(grid)}: "
            f"{', '.join(map(str, grid[:4]))}{', ...' if len(grid) > 4 else ''}): its loss is "
            "not finite; use smaller learning rates."
        )


def classification_scores(
    blocks: Iterable[torch.Tensor],
    y: torch.Tensor,
    n: int,
    shape: tuple[int, int],
    logits_of: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[np.ndarray, np.ndarray]:
    """(accuracy, mean cross-entropy), each (L, G), of heads whose `logits_of(block)` is
    (L, G, b, C), over `blocks` of the `n` rows labelled `y` (in order)."""
    device = y.device
    correct = torch.zeros(shape, dtype=torch.int64, device=device)
    loss = torch.zeros(shape, dtype=torch.float64, device=device)
    start = 0
    with torch.no_grad():
        for xb in blocks:
            yb = y[start : start + xb.shape[1]]
            start += xb.shape[1]
            log_p = logits_of(xb).log_softmax(-1)  # (L, G, b, C)
            correct += (log_p.argmax(-1) == yb).sum(-1)
            idx = yb.view(1, 1, -1, 1).expand(*shape, -1, 1)
            loss -= log_p.gather(-1, idx)[..., 0].sum(-1, dtype=torch.float64)
    return (correct.double() / n).cpu().numpy(), (loss / n).cpu().numpy()


def best_head(main: np.ndarray, tie: np.ndarray) -> tuple[int, int]:
    """(l, g) of the best head: the highest main score, then the highest tie-breaker, then
    the first in the grid's order."""
    flat = int(np.lexsort((-tie.ravel(), -main.ravel()))[0])
    li, g = np.unravel_index(flat, main.shape)
    return int(li), int(g)


def config_grid(*axes: Sequence[Any]) -> list[tuple[Any, ...]]:
    """Every combination of the axes' values, the first axis outermost (lr x wd x ...)."""
    out: list[tuple[Any, ...]] = [()]
    for axis in axes:
        out = [(*c, v) for c in out for v in axis]
    return out
