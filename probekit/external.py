"""`hf:`, `wds:` and `torchvision:` datasets by their earlier module: each is a module of
`probekit.datasets` now."""

from __future__ import annotations

from probekit.datasets.hf import HFReader, hf_dataset
from probekit.datasets.torchvision import TorchvisionReader, torchvision_dataset, with_download
from probekit.datasets.wds import TarReader, wds_dataset

__all__ = [
    "HFReader",
    "TarReader",
    "TorchvisionReader",
    "hf_dataset",
    "torchvision_dataset",
    "wds_dataset",
    "with_download",
]
