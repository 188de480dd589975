"""probekit: which pretrained vision backbone should I use? Cached features, kNN and probes.

The parts that need torch and timm (backbones, data, extract) load on first use, so evaluating
cached features (kNN, probes on stores) does not pay for importing them.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from probekit.cache import FeatureStore, StoreSummary, list_stores, open_store
from probekit.errors import ProbekitError, ProbekitWarning
from probekit.knn import KnnRecord, KnnResult, knn

__version__ = "0.1.0"

_LAZY = {
    "ALIASES": "probekit.backbones",
    "Backbone": "probekit.backbones",
    "BackboneInfo": "probekit.backbones",
    "WeightsInfo": "probekit.backbones",
    "create_backbone": "probekit.backbones",
    "list_backbones": "probekit.backbones",
    "Dataset": "probekit.data",
    "load_dataset": "probekit.data",
    "ExtractResult": "probekit.extract",
    "extract": "probekit.extract",
    "ProbeRecord": "probekit.probes",
    "ProbeResult": "probekit.probes",
    "probe": "probekit.probes",
    "Report": "probekit.report",
    "build_report": "probekit.report",
    "load_records": "probekit.report",
    "write_report": "probekit.report",
    "TriageResult": "probekit.triage",
    "triage": "probekit.triage",
}

__all__ = [
    "ALIASES",
    "Backbone",
    "BackboneInfo",
    "Dataset",
    "ExtractResult",
    "FeatureStore",
    "KnnRecord",
    "KnnResult",
    "ProbeRecord",
    "ProbeResult",
    "ProbekitError",
    "ProbekitWarning",
    "Report",
    "StoreSummary",
    "TriageResult",
    "WeightsInfo",
    "__version__",
    "build_report",
    "create_backbone",
    "extract",
    "knn",
    "list_backbones",
    "list_stores",
    "load_dataset",
    "load_records",
    "open_store",
    "probe",
    "triage",
    "write_report",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'probekit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Importing a submodule sets it as an attribute of its package; where the API has a
    function of the same name (`probekit.extract`, `probekit.knn`), the function stays."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and (name in _LAZY or name == "knn"):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
