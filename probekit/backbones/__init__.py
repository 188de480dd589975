"""Backbone registry over timm: friendly aliases (`aliases.py`), weight sources
(`weights.py`), layer specs, listing, and `create_backbone`."""

from __future__ import annotations

import fnmatch
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import timm
import torch
from timm.data import resolve_model_data_config  # type: ignore[attr-defined]

from probekit.backbones.aliases import ALIASES, EXTRA_MODULES, GROUPS, BackboneAlias
from probekit.backbones.base import Backbone, num_layers
from probekit.backbones.weights import (
    WEIGHT_SOURCES,
    WeightsInfo,
    WeightSource,
    WeightsRequest,
    load_packaged_weights,
    load_state_dict_file,
    sha256_file,
    weight_source,
)
from probekit.defaults import DEFAULT_CROP_PCT, DEFAULT_LAYERS
from probekit.errors import (
    BackboneError,
    LayerSpecError,
    OptionError,
    WeightsError,
    close_matches,
)

__all__ = [
    "ALIASES",
    "DEFAULT_LAYERS",
    "EXTRA_MODULES",
    "GROUPS",
    "WEIGHT_SOURCES",
    "Backbone",
    "BackboneAlias",
    "BackboneInfo",
    "WeightSource",
    "WeightsInfo",
    "check_patch_size",
    "create_backbone",
    "list_backbones",
    "load_packaged_weights",
    "load_state_dict_file",
    "num_layers",
    "parse_layers",
    "resize_input",
    "resolve_backbone_name",
    "sha256_file",
]


@dataclass(frozen=True)
class BackboneInfo:
    """A row of `probekit backbones`."""

    alias: str
    timm_name: str
    group: str
    params_m: float
    default_layers: tuple[int, ...]
    weights: str
    bob: bool = False
    availability: str = "timm-hosted"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- names


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


_LAST_N = re.compile(r"^last(\d*)$")


def parse_layers(spec: str | Sequence[int], n_layers: int) -> tuple[int, ...]:
    """Resolve a layer spec (`last`, `lastN`, `all`, indices, comma lists) to sorted indices.

    Indices count intermediate outputs (transformer blocks, or CNN stages) from 0; negative ones
    count from the end. The pooled embedding (`head`) is always stored besides these.
    """
    terms: list[str | int] = [*spec] if not isinstance(spec, str) else [*spec.split(",")]
    out: set[int] = set()
    for raw in terms:
        term = raw.strip().lower() if isinstance(raw, str) else raw
        if term in ("", "head"):
            continue
        if term == "all":
            out.update(range(n_layers))
            continue
        if isinstance(term, str) and (m := _LAST_N.match(term)):
            n = int(m.group(1) or 1)
            if not 1 <= n <= n_layers:
                raise LayerSpecError(
                    f"layer spec {raw!r} asks for {n} layers; this model has {n_layers} "
                    f"(indices 0..{n_layers - 1}). Use last1..last{n_layers} or 'all'."
                )
            out.update(range(n_layers - n, n_layers))
            continue
        try:
            idx = int(term)
        except ValueError:
            raise LayerSpecError(
                f"cannot parse layer {raw!r}: use 'last', 'lastN' (e.g. last4), 'all', 'head' "
                "or block indices such as 3,-1."
            ) from None
        if not -n_layers <= idx < n_layers:
            raise LayerSpecError(
                f"layer index {idx} is out of range: this model has {n_layers} layers "
                f"(indices 0..{n_layers - 1}, or -{n_layers}..-1)."
            )
        out.add(idx % n_layers)
    return tuple(sorted(out))


# --------------------------------------------------------------------------- listing


def list_backbones(
    pattern: str | None = None,
    *,
    group: str | None = None,
    bob: bool = False,
    with_params: bool = True,
) -> list[BackboneInfo]:
    """Aliases (and, with a pattern, matching timm pretrained names) with params and layers.

    `group`: one of GROUPS (`random`: the random-init baselines of the benchmark's supervised
    architectures, as NAME@random); `bob`: only the Battle of the Backbones models.
    Parameter counts are computed on the meta device: nothing is downloaded or allocated.
    """
    if group is not None and group not in GROUPS:
        raise BackboneError(f"unknown group {group!r}; groups: {', '.join(GROUPS)}.")
    aliases = [a for a in ALIASES.values() if a.bob or not bob]
    if group == "random":
        aliases = [
            BackboneAlias(f"{a.alias}@random", a.timm_name, "random", bob=a.bob)
            for a in aliases
            if a.group == "supervised" and a.bob
        ]
    elif group is not None:
        aliases = [a for a in aliases if a.group == group]
    if pattern:
        aliases = [
            a
            for a in aliases
            if fnmatch.fnmatch(a.alias, pattern) or fnmatch.fnmatch(a.timm_name, pattern)
        ]
    out = []
    for a in aliases:
        weights = (
            "random-init"
            if group == "random"
            else ("package" if a.package else ("url" if a.loader else "hub"))
            if not a.builder
            else "hub (diffusers)"
        )
        out.append(_info(a.alias, a.timm_name, a.group, weights, a, with_params))
    if pattern and group is None and not bob:
        known = {a.timm_name for a in aliases}
        out += [
            _info("", n, "timm", "hub", None, with_params)
            for n in timm.list_models(pattern, pretrained=True)
            if n not in known
        ]
    return out


# builder models, without building them: (parameters in millions, layers), SD 1.5 = VAE 83.7
# + UNet 859.5 M, its layers the UNet's 4 down blocks
_BUILDER_FACTS = {"stable_diffusion_v1_5": (943.2, 4)}


def _info(
    alias: str,
    timm_name: str,
    group: str,
    weights: str,
    row: BackboneAlias | None,
    with_params: bool,
) -> BackboneInfo:
    params, layers = 0.0, tuple[int, ...]()
    if with_params and row is not None and row.builder is not None:
        params, n_layers = _BUILDER_FACTS.get(row.alias, (0.0, 0))
        layers = parse_layers(DEFAULT_LAYERS, n_layers) if n_layers else ()
    elif with_params:
        kwargs: dict[str, Any] = {}
        if row is not None and row.loader:
            from probekit.loaders import LOADERS

            kwargs = {**LOADERS[row.loader].kwargs, "num_classes": 0}
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = timm.create_model(timm_name, pretrained=False, **kwargs)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        try:
            layers = parse_layers(DEFAULT_LAYERS, num_layers(model))
        except BackboneError:
            layers = ()
    return BackboneInfo(
        alias,
        timm_name,
        group,
        params,
        layers,
        weights,
        bob=bool(row and row.bob),
        availability=row.availability if row is not None else "timm-hosted",
    )


# --------------------------------------------------------------------------- weights


def create_backbone(
    name: str,
    *,
    weights: str | os.PathLike[str] | None = None,
    random_init: bool = False,
    img_size: int | None = None,
    seed: int = 0,
    load: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Backbone:
    """Build a timm model in eval mode with the asked weights; see `WeightsInfo` for the record.

    Weights come from the first `WEIGHT_SOURCES` entry that applies: `random_init` (seeded), a
    `weights` file (.safetensors or a tensor-only .pth), a packaged alias (`effnet_lite*`), an
    original checkpoint (converted), or timm's normal pretrained path (HF hub and cache).
    With `load=False` the model is built on the meta device and no weights are read: enough to
    know its layers, preprocessing and which weights it would get (a cache lookup); a process
    builds each skeleton once. A builder (`module:function`, or an alias that names one:
    `probekit.backbones.builders`) is built at most once for a plan and its extraction, and
    not at all for a plan whose card `cache_dir` holds.
    """
    from probekit.backbones.builders import PYTHON_PATH, python_backbone

    opts: dict[str, Any] = {"weights": weights, "random_init": random_init, "img_size": img_size}
    if PYTHON_PATH.match(name):  # module:function, given by the user in so many words
        return python_backbone(name, **opts, load=load, cache_dir=cache_dir)  # type: ignore[no-any-return]
    alias, timm_name = resolve_backbone_name(name)
    if alias is not None and alias.builder is not None:  # probekit's own non-timm models
        return python_backbone(  # type: ignore[no-any-return]
            alias.builder, **opts, load=load, as_name=name, cache_dir=cache_dir
        )
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
