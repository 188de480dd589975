"""probekit: which pretrained vision backbone should I use? Cached features, kNN and probes."""

from __future__ import annotations

__version__ = "0.1.0"

from probekit.backbones import (
    ALIASES,
    Backbone,
    BackboneInfo,
    WeightsInfo,
    create_backbone,
    list_backbones,
)
from probekit.cache import FeatureStore, StoreSummary, list_stores, open_store
from probekit.data import Dataset, load_dataset
from probekit.errors import ProbekitError, ProbekitWarning
from probekit.extract import ExtractResult, extract
from probekit.knn import KnnRecord, KnnResult, knn

__all__ = [
    "ALIASES",
    "Backbone",
    "BackboneInfo",
    "Dataset",
    "ExtractResult",
    "FeatureStore",
    "KnnRecord",
    "KnnResult",
    "ProbekitError",
    "ProbekitWarning",
    "StoreSummary",
    "WeightsInfo",
    "__version__",
    "create_backbone",
    "extract",
    "knn",
    "list_backbones",
    "list_stores",
    "load_dataset",
    "open_store",
]
