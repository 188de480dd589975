"""`probekit ls`: every feature store under a cache root, from its metadata alone."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from probekit.cache.location import cache_root
from probekit.cache.meta import StoreMeta
from probekit.errors import StoreError

__all__ = ["StoreSummary", "list_stores"]


@dataclass(frozen=True)
class StoreSummary:
    """A row of `probekit ls`."""

    path: str
    dataset: str
    backbone: str
    weights: str
    input: str  # the model's input, and where its pixels came from where not its own resize
    layers: tuple[str, ...]
    splits: Mapping[str, int]
    size_bytes: int
    complete: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def list_stores(cache_dir: str | os.PathLike[str] | None = None) -> list[StoreSummary]:
    """Every feature store under the cache root, complete or not (a store whose metadata
    cannot be read is left out)."""
    out = []
    for zjson in sorted(cache_root(cache_dir).glob("*/*.zarr/zarr.json")):
        path = zjson.parent
        try:
            meta = StoreMeta.read(path)
        except StoreError:
            continue
        out.append(
            StoreSummary(
                path=str(path),
                dataset=meta.dataset.spec,
                backbone=meta.backbone.name,
                weights=meta.weights_source or "?",
                input=meta.input_text(),
                layers=meta.feature_names,
                splits=dict(meta.splits),
                size_bytes=sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
                complete=meta.is_complete,
            )
        )
    return out
