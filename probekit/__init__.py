"""probekit: which pretrained vision backbone should I use? Cached features, kNN and probes.

The parts that need torch and timm (backbones, data, extract) load on first use, so evaluating
cached features (kNN, probes on stores) does not pay for importing them.
"""

from __future__ import annotations

from probekit._lazy import lazy_names
from probekit.errors import OptionError, ProbekitError, ProbekitWarning

__version__ = "0.1.0"

# Every public name loads on first use: `probekit --version` and `import probekit` pay for no
# torch, timm or faiss import. Modules are named as nouns (extraction, neighbors, probes,
# triaging), so a function of the API never shares a name with a submodule.
_LAZY = {
    "ALIASES": "probekit.backbones",
    "Backbone": "probekit.backbones",
    "BackboneInfo": "probekit.backbones",
    "WeightsInfo": "probekit.backbones",
    "create_backbone": "probekit.backbones",
    "list_backbones": "probekit.backbones",
    "FeatureStore": "probekit.cache.store",
    "StoreSummary": "probekit.cache.listing",
    "list_stores": "probekit.cache.listing",
    "open_store": "probekit.cache.store",
    "Dataset": "probekit.datasets",
    "load_dataset": "probekit.datasets",
    "ExtractOptions": "probekit.extraction",
    "ExtractResult": "probekit.extraction",
    "extract": "probekit.extraction",
    "KnnRecord": "probekit.neighbors",
    "KnnResult": "probekit.neighbors",
    "knn": "probekit.neighbors",
    "ProbeRecord": "probekit.probes",
    "ProbeResult": "probekit.probes",
    "probe": "probekit.probes",
    "Report": "probekit.report",
    "build_report": "probekit.report",
    "load_records": "probekit.report",
    "write_report": "probekit.report",
    "CompareResult": "probekit.similarity",
    "Similarity": "probekit.similarity",
    "compare": "probekit.similarity",
    "StructureResult": "probekit.structure",
    "structure": "probekit.structure",
    "FewShotResult": "probekit.fewshot",
    "fewshot": "probekit.fewshot",
    "ModelSpec": "probekit.specs",
    "TriageResult": "probekit.triaging",
    "triage": "probekit.triaging",
    "VerifyResult": "probekit.extraction.repair",
    "verify": "probekit.extraction.repair",
}

__all__ = [
    "ALIASES",
    "Backbone",
    "BackboneInfo",
    "CompareResult",
    "Dataset",
    "ExtractOptions",
    "ExtractResult",
    "FeatureStore",
    "FewShotResult",
    "KnnRecord",
    "KnnResult",
    "ModelSpec",
    "OptionError",
    "ProbeRecord",
    "ProbeResult",
    "ProbekitError",
    "ProbekitWarning",
    "Report",
    "Similarity",
    "StoreSummary",
    "StructureResult",
    "TriageResult",
    "VerifyResult",
    "WeightsInfo",
    "__version__",
    "build_report",
    "compare",
    "create_backbone",
    "extract",
    "fewshot",
    "knn",
    "list_backbones",
    "list_stores",
    "load_dataset",
    "load_records",
    "open_store",
    "probe",
    "structure",
    "triage",
    "verify",
    "write_report",
]


__getattr__ = lazy_names(globals(), _LAZY)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
