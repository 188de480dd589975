"""Weights of benchmark backbones that timm does not host, mapped onto timm architectures.

Each loader knows the original checkpoint's public URL and key format, and converts it into a
timm model's state dict; shapes are checked when the converted dict is loaded (strictly: every
tensor of the backbone must come from the checkpoint). Online, checkpoints download once into
torch.hub's cache (`$TORCH_HOME/hub/checkpoints`); offline, pass the file with `--weights FILE`.

Original key formats (what `convert` accepts, with or without a leading `module.`):

- MoCo v3 ViT (facebookresearch/moco-v3, `vits.py`: timm's VisionTransformer, ViT-S with 12
  heads): `module.base_encoder.{cls_token, pos_embed, patch_embed.proj.*, blocks.N.{norm1,
  attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.*, norm.*}`; the projection `head.*`, the
  `momentum_encoder.*` and the `predictor.*` are dropped.
- MoCo v3 ResNet-50: `module.base_encoder.<torchvision resnet50 keys>`, projection `fc.*`
  dropped (likewise the momentum encoder and predictor).
- VICReg ResNet-50 (facebookresearch/vicreg `resnet50.pth`) and DINO ResNet-50
  (facebookresearch/dino `dino_resnet50_pretrain.pth`): torchvision resnet50 keys, no `fc`.
- VICRegL ConvNeXt-B (facebookresearch/VICRegL): the original ConvNeXt keys
  (`downsample_layers.I.J.*`, `stages.I.J.{dwconv, norm, pwconv1, pwconv2, gamma}`, `norm.*`),
  possibly under `backbone.`; converted by timm's own ConvNeXt checkpoint filter. VICRegL
  trained without layer scale, so timm's `gamma` is set to ones; its final LayerNorm becomes
  timm's head norm (timm pools first, VICRegL normalizes the tokens first: the `head` embedding
  differs slightly from VICRegL's own, the stage outputs do not).
- MiDaS v3.1 SwinV2 encoders (isl-org/MiDaS `dpt_swin2_*`): `pretrained.model.<timm 0.6
  SwinV2 keys>` (patch merging at the end of each stage); the DPT decoder (`scratch.*`,
  `pretrained.act_postprocess*`) is dropped and timm's SwinV2 checkpoint filter moves the
  patch merging to the start of the next stage, as timm >= 0.9 has it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from probekit.errors import WeightsError

__all__ = ["LOADERS", "Loader", "convert_checkpoint"]

StateDict = dict[str, torch.Tensor]


def _strip(sd: Mapping[str, torch.Tensor], prefixes: tuple[str, ...]) -> StateDict:
    """Keys under the first prefix any key has (after a leading `module.`), prefix removed."""
    plain = {k.removeprefix("module."): v for k, v in sd.items()}
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in plain):
            return {k[len(prefix) :]: v for k, v in plain.items() if k.startswith(prefix)}
    return plain


def _drop(sd: StateDict, *patterns: str) -> StateDict:
    return {k: v for k, v in sd.items() if not any(re.match(p, k) for p in patterns)}


def _moco_vit(sd: Mapping[str, torch.Tensor], model: torch.nn.Module) -> StateDict:
    return _drop(_strip(sd, ("base_encoder.",)), r"head\.")


def _torchvision_resnet(prefixes: tuple[str, ...]) -> Callable[..., StateDict]:
    def convert(sd: Mapping[str, torch.Tensor], model: torch.nn.Module) -> StateDict:
        return _drop(_strip(sd, prefixes), r"fc\.", r"projector\.", r"head\.")

    return convert


def _convnext(sd: Mapping[str, torch.Tensor], model: torch.nn.Module) -> StateDict:
    from timm.models.convnext import checkpoint_filter_fn

    plain = _drop(_strip(sd, ("backbone.", "encoder.")), r"head\.", r"projector\.", r"maps_")
    out = {
        k: v for k, v in checkpoint_filter_fn(plain, model).items() if not k.startswith("head.fc.")
    }
    for key, value in model.state_dict().items():  # trained without layer scale: a scale of 1
        if key.endswith(".gamma") and key not in out:
            out[key] = torch.ones_like(value, device="cpu")
    return out


def _midas_swinv2(sd: Mapping[str, torch.Tensor], model: torch.nn.Module) -> StateDict:
    from timm.models.swin_transformer_v2 import checkpoint_filter_fn

    plain = _drop(_strip(sd, ("pretrained.model.",)), r"head\.")
    return dict(checkpoint_filter_fn(plain, model))


@dataclass(frozen=True)
class Loader:
    """How one original checkpoint becomes a timm model: architecture, URL, key converter."""

    arch: str  # timm architecture the weights map onto
    url: str  # the original public checkpoint
    convert: Callable[[Mapping[str, torch.Tensor], torch.nn.Module], StateDict]
    source: str  # where the checkpoint comes from, for listings
    kwargs: Mapping[str, Any] = field(default_factory=dict)  # timm.create_model arguments


_FB = "https://dl.fbaipublicfiles.com"
_MIDAS = "https://github.com/isl-org/MiDaS/releases/download/v3_1"
LOADERS: dict[str, Loader] = {
    "mocov3_vits16": Loader(
        "vit_small_patch16_224",
        f"{_FB}/moco-v3/vit-s-300ep/vit-s-300ep.pth.tar",
        _moco_vit,
        "facebookresearch/moco-v3",
        {"num_heads": 12},
    ),
    "mocov3_vitb16": Loader(
        "vit_base_patch16_224",
        f"{_FB}/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar",
        _moco_vit,
        "facebookresearch/moco-v3",
    ),
    "mocov3_resnet50": Loader(
        "resnet50",
        f"{_FB}/moco-v3/r-50-1000ep/r-50-1000ep.pth.tar",
        _torchvision_resnet(("base_encoder.",)),
        "facebookresearch/moco-v3",
    ),
    "vicreg_resnet50": Loader(
        "resnet50",
        f"{_FB}/vicreg/resnet50.pth",
        _torchvision_resnet(("backbone.",)),
        "facebookresearch/vicreg",
    ),
    "vicregl_convnext_base": Loader(
        "convnext_base",
        f"{_FB}/vicregl/convnext_base_alpha0.75.pth",
        _convnext,
        "facebookresearch/VICRegL",
    ),
    "dino_resnet50": Loader(
        "resnet50",
        f"{_FB}/dino/dino_resnet50_pretrain/dino_resnet50_pretrain.pth",
        _torchvision_resnet(("backbone.",)),
        "facebookresearch/dino",
    ),
    "midas31_swinv2_tiny": Loader(
        "swinv2_tiny_window16_256",
        f"{_MIDAS}/dpt_swin2_tiny_256.pt",
        _midas_swinv2,
        "isl-org/MiDaS v3.1",
    ),
    "midas31_swinv2_base": Loader(
        "swinv2_base_window12to24_192to384",
        f"{_MIDAS}/dpt_swin2_base_384.pt",
        _midas_swinv2,
        "isl-org/MiDaS v3.1",
    ),
    "midas31_swinv2_large": Loader(
        "swinv2_large_window12to24_192to384",
        f"{_MIDAS}/dpt_swin2_large_384.pt",
        _midas_swinv2,
        "isl-org/MiDaS v3.1",
    ),
}


def convert_checkpoint(
    name: str, loader: Loader, sd: Mapping[str, torch.Tensor], model: torch.nn.Module
) -> StateDict:
    """The checkpoint as the timm model's state dict; every backbone tensor must be in it with
    its shape (the classifier, which these backbones lack, may be missing)."""
    try:
        out = loader.convert(sd, model)
    except (KeyError, RuntimeError, ValueError) as e:
        raise WeightsError(
            f"the checkpoint for {name!r} is not in the {loader.source} format probekit maps onto "
            f"{loader.arch} ({type(e).__name__}: {str(e)[:120]})."
        ) from None
    own = model.state_dict()
    missing = [k for k in own if k not in out and not _optional(k)]
    unexpected = [k for k in out if k not in own]
    shape = [k for k in out if k in own and out[k].shape != own[k].shape]
    if missing or unexpected or shape:
        raise WeightsError(
            f"the checkpoint for {name!r} does not have the {loader.source} format probekit "
            f"maps onto {loader.arch}: missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"shape mismatch {shape[:3]} ({len(missing)}/{len(unexpected)}/{len(shape)})."
        )
    return out


def _optional(key: str) -> bool:
    """Buffers a model recomputes itself (SwinV2 position tables, masks)."""
    return any(s in key for s in ("relative_position_index", "relative_coords_table", "attn_mask"))
