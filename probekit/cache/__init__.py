"""The Zarr v3 feature cache: one store per dataset x backbone config (see store.py)."""

from probekit.cache.store import (
    FORMAT_VERSION,
    FeatureStore,
    StoreConfig,
    StoreLock,
    StoreSummary,
    cache_root,
    list_stores,
    open_store,
)

__all__ = [
    "FORMAT_VERSION",
    "FeatureStore",
    "StoreConfig",
    "StoreLock",
    "StoreSummary",
    "cache_root",
    "list_stores",
    "open_store",
]
