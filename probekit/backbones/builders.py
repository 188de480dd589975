"""Backbones built by a Python function: `--backbone package.module:function` (the user's own)
and probekit's builder aliases (`stable_diffusion_v1_5` -> `probekit.sd:stable_diffusion_v1_5`).

Decided before anything is built, as timm resolves a pretrained source before loading:
- identity: a hash of the function's module file and the function's name (no tensor is
  hashed, nothing is built); a `--weights` file is identified by its own hash;
- whether it takes an input size: the function has an `img_size` parameter;
- a skeleton: what a plan needs of the model (layers, class token, preprocessing, cost). The
  first build writes it down beside the cache (`<cache>/.builders/`), so a later run whose
  store is complete builds nothing;
- one build a process for a plan and its extraction: the model the plan looked at is the one
  extracted (the last one built is kept).

Store metadata, reports and listings never import such a function: only a --backbone given in
so many words does.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from probekit.errors import BackboneError, WeightsError, not_a_file

__all__ = ["PYTHON_PATH", "BuilderCall", "Described", "builds", "python_backbone"]

# `package.module:function`: the only form that imports user code, and only when a user passes it
PYTHON_PATH = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):([A-Za-z_]\w*)$")

# every call of a builder function this process made (a test counts them)
builds: list[str] = []
# the last builder model built, by (path, identity, size): a plan's skeleton and its extraction
_LAST: dict[tuple[str, str, int | None], Any] = {}


@dataclass(frozen=True)
class BuilderCall:
    """A builder function, resolved (imported, not called): its path, identity, whether it
    takes an input size."""

    path: str  # module:function
    fn: Callable[..., Any]
    digest: str  # sha256 of the module file and the function's name

    @classmethod
    def resolve(cls, path: str) -> BuilderCall:
        match = PYTHON_PATH.match(path)
        if match is None:
            raise BackboneError(f"{path!r} is not a module:function path.")
        module, func = match.groups()
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            raise BackboneError(
                f"cannot import {module!r} for --backbone {path!r} ({e}); put it on PYTHONPATH."
            ) from None
        fn = getattr(mod, func, None)
        if not callable(fn):
            raise BackboneError(f"{module!r} has no function {func!r} (from --backbone {path!r}).")
        h = hashlib.sha256()
        source = getattr(mod, "__file__", None)
        h.update(
            Path(source).read_bytes() if source and os.path.isfile(source) else module.encode()
        )
        h.update(b"\0" + func.encode())
        return cls(path, fn, h.hexdigest())

    @property
    def takes_size(self) -> bool:
        return "img_size" in inspect.signature(self.fn).parameters

    def call(self, img_size: int | None) -> torch.nn.Module:
        builds.append(self.path)
        model = self.fn() if img_size is None else self.fn(img_size=img_size)
        if not isinstance(model, torch.nn.Module):
            raise BackboneError(
                f"{self.path}() returned {type(model).__name__}, not a torch.nn.Module."
            )
        return model


class Described(torch.nn.Module):
    """A builder model as its card describes it (layers, class token, preprocessing, cost):
    what a plan reads of a skeleton, with nothing built."""

    def __init__(self, card: dict[str, Any]):
        super().__init__()
        self.probekit_card = card
        self.feature_info = card["feature_info"]
        self.num_prefix_tokens = card["num_prefix_tokens"]
        self.cls_token = torch.nn.Parameter(torch.empty(0)) if card["class_token"] else None
        self.pretrained_cfg = card["data_config"]

    def forward_intermediates(self, *args: Any, **kwargs: Any) -> Any:
        raise BackboneError("a described builder model is not run: build it (load=True).")


def _card_path(cache_dir: str | os.PathLike[str] | None, key: str) -> Path | None:
    from probekit.cache.location import cache_root, is_remote

    root = cache_root(cache_dir)
    if is_remote(str(root)):
        return None
    return Path(str(root)) / ".builders" / f"{key}.json"


def _card_of(model: torch.nn.Module, data_config: dict[str, Any], native: int) -> dict[str, Any]:
    from probekit.backbones.cost import count_gmacs, count_params

    size = tuple(int(v) for v in data_config["input_size"][1:])
    try:
        gmacs: float | None = round(count_gmacs(model, size), 4)  # type: ignore[arg-type]
    except Exception:
        gmacs = None
    return {
        "feature_info": [dict(f) for f in getattr(model, "feature_info", [])],
        "num_prefix_tokens": int(getattr(model, "num_prefix_tokens", 0) or 0),
        "class_token": getattr(model, "cls_token", None) is not None,
        "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()},
        "native_size": native,
        "params": count_params(model),
        "gmacs": gmacs,
    }


def python_backbone(
    name: str,
    *,
    weights: str | os.PathLike[str] | None,
    random_init: bool,
    img_size: int | None,
    load: bool = True,
    as_name: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
) -> Any:
    """The backbone `name` (`module:function`) builds, or with `load=False` its skeleton: the
    model built at most once a process for a plan and its extraction, described by its card
    (nothing built) where an earlier build wrote one. `seed`: unused (a function seeds its own
    model)."""
    from timm.data import resolve_model_data_config  # type: ignore[attr-defined]

    from probekit.backbones.base import Backbone, num_layers
    from probekit.backbones.weights import (
        WeightsInfo,
        _load_into,
        load_state_dict_file,
        sha256_file,
    )

    label = as_name or name
    if random_init:
        raise BackboneError(
            f"--backbone {label!r} builds its own model: --random-init does not apply "
            "(set it inside the function)."
        )
    call = BuilderCall.resolve(name)
    if img_size is not None and not call.takes_size:
        raise BackboneError(
            f"{label} is built at its own input size ({name}() takes no img_size): evaluate "
            "it with --img-size native, or give its function an img_size parameter."
        )
    info = WeightsInfo("python", name, call.digest)
    path = None
    if weights is not None:
        path = Path(weights).expanduser().resolve()
        if why := not_a_file(path, "weights file"):
            raise WeightsError(why)
        info = WeightsInfo("file", str(path), sha256_file(path))
    key = (name, info.key, img_size)
    card_file = _card_path(cache_dir, hashlib.sha256(repr(key).encode()).hexdigest()[:24])
    if not load and key not in _LAST and card_file is not None and card_file.is_file():
        card = json.loads(card_file.read_text())
        model: torch.nn.Module = Described(card)
        data_config, native = card["data_config"], card["native_size"]
        return Backbone(label, label, model, info, data_config, native_size=native)
    if key not in _LAST:
        _LAST.clear()  # one builder model held at a time
        built = call.call(img_size)
        num_layers(built)
        if path is not None:
            _load_into(built, load_state_dict_file(path), f"weights file {str(path)!r}")
        built.eval().requires_grad_(False)
        data_config = dict(resolve_model_data_config(built))
        native = int(data_config["input_size"][-1])
        if img_size is not None:  # the evaluation protocol's resize and crop, as for timm's
            from probekit.defaults import DEFAULT_CROP_PCT

            size = (3, img_size, img_size)
            data_config.update(input_size=size, crop_pct=DEFAULT_CROP_PCT, crop_mode="center")
        card = _card_of(built, data_config, native)  # its cost counted once, here
        built.__dict__["probekit_card"] = card  # what a plan reads, as of a described model
        if card_file is not None:
            card_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = card_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(card))
            os.replace(tmp, card_file)
        _LAST[key] = Backbone(label, label, built, info, data_config, native_size=native)
    return _LAST[key]
