"""A complete feature store made from arrays already in memory (features computed elsewhere,
or derived from other stores, such as two backbones' features side by side), so that kNN
and every probe read it like any extracted store."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from probekit.cache.location import Location, location
from probekit.cache.store import FeatureStore, StoreConfig
from probekit.errors import ProbekitError

__all__ = ["store_from_arrays"]


def store_from_arrays(
    path: str | Location,
    splits: Mapping[str, tuple[Mapping[str, np.ndarray], np.ndarray]],
    class_names: Sequence[str],
    *,
    backbone: str = "arrays",
    dataset: str | None = None,
    ids: Mapping[str, Sequence[str]] | None = None,
    chunk_rows: int | None = None,
    num_layers: int | None = None,
    fingerprint: str = "-",
) -> FeatureStore:
    """Write a complete float32 store at `path`: splits = {split: ({feature: (N, D)}, labels
    (N,))}; feature names are `layer<i>/<pool>` (a full layer x pool grid) and `head/embed`.
    `ids`: each split's image ids (default: `<split><row>`)."""
    loc = location(str(path)) if isinstance(path, str) else path
    first = next(iter(splits.values()))[0]
    dims = {k: int(v.shape[1]) for k, v in first.items()}
    layer_pools = [k.partition("/") for k in dims if k != "head/embed"]
    layers = tuple(sorted({int(la.removeprefix("layer")) for la, _, _ in layer_pools}))
    pools = tuple(sorted({p for _, _, p in layer_pools}))
    cfg = StoreConfig(dataset or "arrays", backbone, "given", {}, layers, pools, "float32", "fp32")
    if sorted(cfg.feature_names) != sorted(dims):
        raise ProbekitError(
            f"features {sorted(dims)} are not a layer x pool grid with head/embed "
            f"(expected {sorted(cfg.feature_names)})."
        )
    meta: dict[str, Any] = {
        "dataset": {"spec": dataset or f"arrays:{loc.name}", "fingerprint": fingerprint},
        "backbone": {"name": backbone, "num_layers": num_layers},
        "weights": {"source": "given"},
        "class_names": list(class_names),
    }
    n = chunk_rows or max(len(y) for _, y in splits.values())
    store = FeatureStore.create(
        loc, cfg, meta, {s: len(y) for s, (_, y) in splits.items()}, dims, n, set()
    )
    for s, (x, y) in splits.items():
        names = list(ids[s]) if ids is not None else [f"{s}{i}" for i in range(len(y))]
        for chunk, start in enumerate(range(0, len(y), n)):
            rows = slice(start, start + n)
            store.write_chunk(
                s,
                chunk,
                n,
                {
                    **{k: np.asarray(v[rows], np.float32) for k, v in x.items()},
                    "labels": np.asarray(y[rows], np.int64),
                    "valid": np.ones(len(y[rows]), bool),
                    "ids": np.array(names[rows]),
                    "errors": np.array([""] * len(y[rows])),
                },
            )
    store.update_meta(status="complete")
    return store
