"""What a backbone costs: parameters, and multiply-adds per image at an input size, counted on
the model itself (not looked up)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["count_gmacs", "count_params"]


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def _unfused_attention(model: torch.nn.Module) -> Iterator[None]:
    """timm's attention as explicit matrix products while counting: a fused attention kernel
    has no FLOP formula on every backend, and would go uncounted."""
    fused = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    try:
        for m, _ in fused:
            setattr(m, "fused_attn", False)  # noqa: B010
        yield
    finally:
        for m, was in fused:
            setattr(m, "fused_attn", was)  # noqa: B010


def count_gmacs(model: torch.nn.Module, size: tuple[int, int]) -> float:
    """GMACs of one image's forward at (height, width): half the FLOPs torch's
    `FlopCounterMode` counts (the convention of timm's tables and fvcore: a multiply-add is one
    MAC), attention products included. On a meta-device model nothing is computed."""
    from torch.utils.flop_counter import FlopCounterMode

    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    x = torch.zeros(1, 3, *size, device=device)
    with _unfused_attention(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return float(counter.get_total_flops()) / 2e9
