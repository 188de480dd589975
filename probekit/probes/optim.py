"""AdamW over a grid of probes trained together: parameters shaped (L, G, ...), probe (l, g)
with its own learning rate and weight decay (G = the lr x wd grid), and the schedule every
batched probe follows (a linear warmup, then a cosine decay)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

__all__ = ["GridAdamW", "warmup_cosine"]


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """The learning-rate factor at `step` (1-based): linear up to 1 over `warmup` steps, then
    a cosine to 0 at `total`."""
    if step <= warmup:
        return step / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


class GridAdamW:
    """AdamW (betas 0.9, 0.999, eps 1e-8, decoupled weight decay) on parameters (L, G, ...):
    probe g of the grid steps with `lrs[g]` and decays the parameters in `decayed` by `wds[g]`.
    Probes never interact, so each steps exactly as it would alone."""

    def __init__(
        self,
        params: Mapping[str, torch.Tensor],
        lrs: Sequence[float],
        wds: Sequence[float],
        decayed: Sequence[str],
    ):
        some = next(iter(params.values()))
        self.params, self.decayed = params, set(decayed)
        self.lr = torch.tensor(list(lrs), dtype=some.dtype, device=some.device)
        self.wd = torch.tensor(list(wds), dtype=some.dtype, device=some.device)
        self.m1 = {k: torch.zeros_like(v) for k, v in params.items()}
        self.m2 = {k: torch.zeros_like(v) for k, v in params.items()}
        self.steps = 0

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor], scale: float = 1.0) -> None:
        """One step with `grads` (in the order of `params`), the learning rates times `scale`."""
        self.steps += 1
        t = self.steps
        for (name, p), g in zip(self.params.items(), grads, strict=True):
            g = g.to(p.dtype)
            view = (1, len(self.lr)) + (1,) * (p.ndim - 2)
            lr = (self.lr * scale).view(view)
            if name in self.decayed:
                p.mul_(1 - lr * self.wd.view(view))
            self.m1[name].mul_(0.9).add_(g, alpha=0.1)
            self.m2[name].mul_(0.999).addcmul_(g, g, value=0.001)
            m_hat = self.m1[name] / (1 - 0.9**t)
            v_hat = self.m2[name] / (1 - 0.999**t)
            p.sub_(lr * m_hat / (v_hat.sqrt() + 1e-8))
