"""`probekit backbones`: the aliases by benchmark group (and, with a pattern, timm's pretrained
names) with their parameters and default layers; layer specs (`last4`, `3,-1`)."""

from __future__ import annotations

import fnmatch
import re
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import timm
import torch

from probekit.backbones.aliases import ALIASES, GROUPS, BackboneAlias
from probekit.backbones.base import num_layers
from probekit.defaults import DEFAULT_LAYERS
from probekit.errors import (
    BackboneError,
    LayerSpecError,
)

__all__ = ["BackboneInfo", "list_backbones", "parse_layers"]


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
