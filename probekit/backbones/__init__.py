"""Backbones by name: `create_backbone` asks the name's source (`sources.py`: timm, a Python
builder) for the model or its skeleton.

    base.py         Backbone, num_layers          sources.py   the sources, decided by name
    timm_models.py  timm names, skeletons, sizes  builders.py  module:function and builder aliases
    weights.py      where a timm model's weights come from        aliases.py  probekit's names
    listing.py      `probekit backbones`, layer specs
"""

from __future__ import annotations

import os

from probekit.backbones.aliases import ALIASES, EXTRA_MODULES, GROUPS, BackboneAlias
from probekit.backbones.base import Backbone, num_layers
from probekit.backbones.listing import BackboneInfo, list_backbones, parse_layers
from probekit.backbones.timm_models import (
    check_patch_size,
    create_timm_backbone,
    resize_input,
    resolve_backbone_name,
)
from probekit.backbones.weights import (
    WEIGHT_SOURCES,
    WeightsInfo,
    WeightSource,
    load_packaged_weights,
    load_state_dict_file,
    sha256_file,
)
from probekit.defaults import DEFAULT_LAYERS

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
    "create_timm_backbone",
    "list_backbones",
    "load_packaged_weights",
    "load_state_dict_file",
    "num_layers",
    "parse_layers",
    "resize_input",
    "resolve_backbone_name",
    "sha256_file",
]


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
    """The backbone `name` in eval mode with the asked weights, from its source (decided by
    the name: `probekit.backbones.sources`); see `WeightsInfo` for the record.

    timm: weights come from the first `WEIGHT_SOURCES` entry that applies: `random_init`
    (seeded), a `weights` file (.safetensors or a tensor-only .pth), a packaged alias
    (`effnet_lite*`), an original checkpoint (converted), or timm's normal pretrained path (HF
    hub and cache). With `load=False` the model is built on the meta device and no weights
    are read: enough to know its layers, preprocessing and which weights it would get (a
    cache lookup); a process builds each skeleton once. A builder (`module:function`, or an
    alias that names one: `probekit.backbones.builders`) is built at most once for a plan and
    its extraction, and not at all for a plan whose card `cache_dir` holds.
    """
    from probekit.backbones.sources import source_of

    return source_of(name).create(
        name,
        weights=weights,
        random_init=random_init,
        img_size=img_size,
        seed=seed,
        load=load,
        cache_dir=cache_dir,
    )
