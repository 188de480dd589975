"""Backbones from timm: a name (an alias, `arch` or `arch.tag`) resolved, its skeleton made
on the meta device (once a process), its weights decided before they load (`weights.py`) and
loaded, its input size set the way timm sets it."""

from __future__ import annotations

import os
import warnings
from typing import Any

import timm
import torch
from timm.data import resolve_model_data_config  # type: ignore[attr-defined]

from probekit.backbones.aliases import ALIASES, BackboneAlias
from probekit.backbones.base import Backbone, num_layers
from probekit.backbones.weights import (
    WeightsRequest,
    weight_source,
)
from probekit.defaults import DEFAULT_CROP_PCT
from probekit.errors import (
    BackboneError,
    OptionError,
    WeightsError,
    close_matches,
)

__all__ = [
    "check_patch_size",
    "create_timm_backbone",
    "resize_input",
    "resolve_backbone_name",
]


def resolve_backbone_name(name: str) -> tuple[BackboneAlias | None, str]:
    """Map an alias or a timm `arch[.tag]` name to (alias or None, timm name); raise if unknown."""
    if name in ALIASES:
        return ALIASES[name], ALIASES[name].timm_name
    arch, _, tag = name.partition(".")
    if arch not in _all_architectures():
        raise BackboneError(
            f"unknown backbone {name!r}: neither a probekit alias nor a timm model."
            + close_matches(name, [*ALIASES, *_all_architectures()])
            + " See `probekit backbones` for aliases, `probekit backbones 'vit_*'` for timm names."
        )
    if tag and name not in _all_pretrained():
        tags = [p for p in _all_pretrained() if p.startswith(arch + ".")]
        raise BackboneError(
            f"timm has no pretrained tag {tag!r} for {arch!r}; its tags: "
            + (", ".join(t.partition(".")[2] for t in tags) or "none")
            + ". Use one of them, --weights FILE, or --random-init."
        )
    return None, name


def _all_architectures() -> set[str]:
    return set(timm.list_models())


def _all_pretrained() -> set[str]:
    return set(timm.list_models(pretrained=True))


def create_timm_backbone(
    name: str,
    *,
    weights: str | os.PathLike[str] | None = None,
    random_init: bool = False,
    img_size: int | None = None,
    seed: int = 0,
    load: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Backbone:
    """A timm model (or, `load=False`, its skeleton: made once a process)."""
    alias, timm_name = resolve_backbone_name(name)
    opts: dict[str, Any] = {"weights": weights, "random_init": random_init, "img_size": img_size}
    if not load:
        key = (name, _file_key(weights), random_init, img_size, seed)
        if key not in _SKELETONS:
            _SKELETONS[key] = _timm_backbone(name, alias, timm_name, **opts, seed=seed, load=False)
        return _SKELETONS[key]
    return _timm_backbone(name, alias, timm_name, **opts, seed=seed, load=True)


# skeletons (meta device, no weights) a process made, by what decides them
_SKELETONS: dict[tuple[Any, ...], Backbone] = {}


def _file_key(weights: str | os.PathLike[str] | None) -> Any:
    """A weights file as a skeleton's key: its path, size and time (a changed file: another)."""
    if weights is None:
        return None
    try:
        st = os.stat(weights)
    except OSError:
        return str(weights)
    return (str(weights), st.st_size, st.st_mtime_ns)


def _timm_backbone(
    name: str,
    alias: BackboneAlias | None,
    timm_name: str,
    *,
    weights: str | os.PathLike[str] | None,
    random_init: bool,
    img_size: int | None,
    seed: int,
    load: bool,
) -> Backbone:
    """A timm model (or its meta-device skeleton) with the weights `weight_source` decides."""
    if weights is not None and random_init:
        raise WeightsError("pass either --weights FILE or --random-init, not both.")
    kwargs: dict[str, Any] = {}
    if alias is not None and alias.loader is not None:
        from probekit.loaders import LOADERS

        kwargs.update(LOADERS[alias.loader].kwargs, num_classes=0)

    def build(pretrained: bool, **extra: Any) -> torch.nn.Module:
        try:
            model = timm.create_model(timm_name, pretrained=pretrained, **kwargs, **extra)
        except TypeError as e:
            if "img_size" in kwargs and "img_size" in str(e):
                raise BackboneError(
                    f"{name} cannot be built for {img_size} px inputs ({e}); use its own size "
                    "(--img-size native) or another size."
                ) from None
            raise
        return model

    resizes = img_size is not None  # set_input_size once the weights are in (see below)

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        skeleton = build(False)
        if img_size is not None and not hasattr(skeleton, "set_input_size"):
            resizes = False
            if getattr(skeleton, "patch_embed", None) is not None:  # a fixed-size token model
                check_patch_size(skeleton, name, img_size)
                kwargs["img_size"] = img_size  # timm resamples pretrained position embeddings
                skeleton = build(False)
            # CNNs take any resolution as they are
        if resizes:
            assert img_size is not None
            resize_input(skeleton, name, img_size)
    num_layers(skeleton)  # fail early on models without forward_intermediates
    pcfg = dict(getattr(skeleton, "pretrained_cfg", {}) or {})
    request = WeightsRequest(name, timm_name, alias, weights, random_init, seed, pcfg)
    source = weight_source(request)
    info = source.resolve(request)  # decide: which weights, without loading them
    model = skeleton
    if load:  # act: build the model with them
        model, info = source.load(request, info, build)
        if resizes:  # after its weights: position embeddings resampled from theirs
            assert img_size is not None
            resize_input(model, name, img_size)
    model.eval().requires_grad_(False)
    data_config = dict(resolve_model_data_config(model))
    native = [int(v) for v in pcfg.get("input_size") or data_config["input_size"]]
    if img_size is not None:  # the evaluation protocol's resize and crop, the model's own norm
        data_config.update(
            input_size=(3, img_size, img_size), crop_pct=DEFAULT_CROP_PCT, crop_mode="center"
        )
    return Backbone(name, timm_name, model, info, data_config, native_size=native[-1])


def check_patch_size(model: torch.nn.Module, name: str, img_size: int) -> None:
    """A size a patch model cuts into whole patches, or a one-line error saying which to use."""
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is None:
        return
    sides = tuple(patch) if isinstance(patch, (tuple, list)) else (patch, patch)
    step = max(int(v) for v in sides)
    if img_size % step:
        near = max(step, round(img_size / step) * step)
        raise OptionError(
            f"img_size {img_size} is not a whole number of {name}'s {step} px patches; use a "
            f"multiple of {step} (e.g. {near})."
        )


def resize_input(model: torch.nn.Module, name: str, img_size: int) -> None:
    """Make a token model take `img_size` px inputs the way timm does (`set_input_size`:
    position embeddings resampled, window sizes adapted); a one-line error where it cannot."""
    check_patch_size(model, name, img_size)
    try:
        model.set_input_size(img_size=(img_size, img_size))  # type: ignore[operator]
    except Exception as e:  # window sizes that do not divide, and the like
        raise BackboneError(
            f"{name} cannot take {img_size} px inputs ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:120] if str(e) else ''}); use its own size "
            "(--img-size native) or another size."
        ) from None
