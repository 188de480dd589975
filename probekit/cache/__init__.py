"""The Zarr v3 stores: features (store.py) and pixels (pixels.py), their metadata (meta.py),
locations and listing, and the helper processes that write chunks and read pixels. Storage
only: nothing here imports probekit above `errors`.

Names load on first use: listing stores and reading their metadata import no Zarr.
"""

from __future__ import annotations

from probekit._lazy import lazy_names

_LAZY = {
    "FORMAT_VERSION": "probekit.cache.meta",
    "StoreMeta": "probekit.cache.meta",
    "FeatureStore": "probekit.cache.store",
    "StoreConfig": "probekit.cache.store",
    "StoreLock": "probekit.cache.store",
    "open_store": "probekit.cache.store",
    "StoreSummary": "probekit.cache.listing",
    "list_stores": "probekit.cache.listing",
    "cache_root": "probekit.cache.location",
}

__all__ = [
    "FORMAT_VERSION",
    "FeatureStore",
    "StoreConfig",
    "StoreLock",
    "StoreMeta",
    "StoreSummary",
    "cache_root",
    "list_stores",
    "open_store",
]


__getattr__ = lazy_names(globals(), _LAZY)
