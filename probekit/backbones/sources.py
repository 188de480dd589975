"""Where a backbone comes from, decided by its name before anything loads (as timm's
`parse_model_name` and `_resolve_pretrained_source` do): one `BackboneSource` a kind, tried
in order, the first whose `matches` takes the name.

Each source gives a cheap identity (the weights a name would get: a timm tag and its file,
a module file's hash; nothing built), whether it takes an input size, a build (`create`,
whose `load=False` is a skeleton: enough for a plan and a cache lookup) and a listing. A new
source (transformers:, hub:, open_clip:) is a module and one entry of `SOURCES`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from probekit.backbones.base import Backbone
    from probekit.backbones.weights import WeightsInfo

__all__ = ["SOURCES", "BackboneSource", "source_of"]


@dataclass(frozen=True)
class BackboneSource:
    """One kind of backbone name and what it gives before and when it is built."""

    kind: str
    summary: str
    matches: Callable[[str], bool]
    # (name, weights) -> the weights it would get, with nothing built
    identity: Callable[[str, str | os.PathLike[str] | None], WeightsInfo]
    takes_size: Callable[[str], bool]
    create: Callable[..., Backbone]  # create_backbone's keywords; load=False: a skeleton
    listing: Callable[[str | None], list[Any]]  # a pattern -> rows of `probekit backbones`


def _is_python(name: str) -> bool:
    from probekit.backbones.builders import PYTHON_PATH

    return bool(PYTHON_PATH.match(name))


def _builder_of(name: str) -> str | None:
    from probekit.backbones.aliases import ALIASES

    alias = ALIASES.get(name)
    return alias.builder if alias is not None else None


def _python_identity(name: str, weights: str | os.PathLike[str] | None) -> WeightsInfo:
    from probekit.backbones.builders import BuilderCall
    from probekit.backbones.weights import WeightsInfo, sha256_file

    if weights is not None:
        return WeightsInfo("file", os.path.abspath(weights), sha256_file(weights))
    path = _builder_of(name) or name
    return WeightsInfo("python", path, BuilderCall.resolve(path).digest)


def _python_takes_size(name: str) -> bool:
    from probekit.backbones.builders import BuilderCall

    return BuilderCall.resolve(_builder_of(name) or name).takes_size


def _python_create(name: str, **kwargs: Any) -> Backbone:
    from probekit.backbones.builders import python_backbone

    builder = _builder_of(name)
    if builder is not None:
        return python_backbone(builder, as_name=name, **kwargs)  # type: ignore[no-any-return]
    return python_backbone(name, **kwargs)  # type: ignore[no-any-return]


def _timm_identity(name: str, weights: str | os.PathLike[str] | None) -> WeightsInfo:
    from probekit.backbones.timm_models import create_timm_backbone

    return create_timm_backbone(name, weights=weights, load=False).weights


def _timm_create(name: str, **kwargs: Any) -> Backbone:
    from probekit.backbones.timm_models import create_timm_backbone

    return create_timm_backbone(name, **kwargs)


def _timm_listing(pattern: str | None) -> list[Any]:
    from probekit.backbones.listing import list_backbones

    return list_backbones(pattern, with_params=False)


# tried in order: the first that matches a name is its source
SOURCES: tuple[BackboneSource, ...] = (
    BackboneSource(
        "python",
        "`package.module:function`: the user's own function builds it",
        _is_python,
        _python_identity,
        _python_takes_size,
        _python_create,
        lambda pattern: [],
    ),
    BackboneSource(
        "builder",
        "an alias probekit builds itself (stable_diffusion_v1_5)",
        lambda name: _builder_of(name) is not None,
        _python_identity,
        _python_takes_size,
        _python_create,
        lambda pattern: [],
    ),
    BackboneSource(
        "timm",
        "a timm model (an alias, `arch` or `arch.tag`), weights as its alias or timm says",
        lambda name: True,
        _timm_identity,
        lambda name: True,  # set_input_size, img_size=, or a CNN that takes any size
        _timm_create,
        _timm_listing,
    ),
)


def source_of(name: str) -> BackboneSource:
    """The source of backbone `name` (decided from the name alone)."""
    return next(s for s in SOURCES if s.matches(name))
