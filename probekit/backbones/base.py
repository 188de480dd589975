"""What every backbone source gives: a `Backbone` (the model, the name it was asked by, its
weights and preprocessing) and the layers its `forward_intermediates` can return."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from probekit.backbones.weights import WeightsInfo
from probekit.errors import BackboneError

__all__ = ["Backbone", "num_layers"]


def num_layers(model: torch.nn.Module) -> int:
    """How many intermediate outputs `forward_intermediates` can return for this model."""
    info = getattr(model, "feature_info", None)
    if not hasattr(model, "forward_intermediates") or not info:
        raise BackboneError(
            f"{type(model).__name__} has no timm forward_intermediates(); probekit extracts "
            "intermediate layers through it. Pick a timm model family that has it (ViT, ConvNeXt, "
            "ResNet, Swin, EfficientNet, ...)."
        )
    return len(info)


@dataclass(frozen=True)
class Backbone:
    """A timm model ready for extraction, with the name it was asked by and its weights."""

    name: str
    timm_name: str
    model: torch.nn.Module
    weights: WeightsInfo
    data_config: Mapping[str, Any] = field(default_factory=dict)
    native_size: int = 0  # the input side its weights were trained at (timm's pretrained cfg)

    @property
    def num_layers(self) -> int:
        return num_layers(self.model)

    @property
    def has_class_token(self) -> bool:
        return int(getattr(self.model, "num_prefix_tokens", 0) or 0) > 0 and bool(
            getattr(self.model, "cls_token", None) is not None
        )
