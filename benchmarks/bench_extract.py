"""Images/s of the full `probekit.extract` pipeline vs the bare model forward, in one run.

Both sides see the same pre-decoded images (uint8, already at the model's input size), the
same batch size and precision. The pipeline adds: DataLoader, normalization on the device,
forward_intermediates over the stored layers, pooling, the fp16 cast and the Zarr writer.

    python benchmarks/bench_extract.py [--models vit_tiny_patch16_224,resnet18] [--images 1024,512]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from common import RESULTS, cpu_name, save_result

import probekit
from probekit.backbones import create_backbone, parse_layers
from probekit.data import Dataset, Split
from probekit.extract import FeatureExtractor, resolve_policy


def predecoded(n: int, size: int) -> Dataset:
    """n random RGB images at exactly the model's input size: the geometry step is a no-op."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    labels = np.arange(n) % 10
    split = Split("train", tuple(f"img{i}" for i in range(n)), labels)
    return Dataset(
        f"bench:{n}x{size}",
        f"bench-{n}x{size}",
        tuple(map(str, range(10))),
        {"train": split},
        fingerprint=str(n),
        arrays={"train": images},
        preprocessed=True,
    )


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], steps: int, device: str) -> float:
    """Seconds per call of fn, after two warm-up calls, with device syncs around the region."""
    for _ in range(2):
        fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t) / steps


def bench(
    model_name: str, n: int, batch_size: int, device: str, precision: str, repeats: int
) -> dict:
    """`repeats` rounds, each timing bare, pipeline and bare multi-layer back to back; medians."""
    policy = resolve_policy(device, precision)
    bb = create_backbone(model_name, random_init=True)
    size = int(bb.data_config["input_size"][-1])
    layers = list(parse_layers("last4", bb.num_layers))
    ds = predecoded(n, size)
    fx = FeatureExtractor(bb, layers, ["cls", "mean"] if bb.has_class_token else ["mean"], policy)
    x = torch.from_numpy(ds.arrays["train"][:batch_size]).permute(0, 3, 1, 2)
    xn = fx.normalize(x)
    model: Any = bb.model
    steps = max(1, n // batch_size)
    # pipeline: the whole extract() call (cold cache: store creation and writes included)
    kw: dict[str, Any] = dict(
        random_init=True,
        device=device,
        precision=precision,
        quiet=True,
        batch_size=batch_size,
        num_workers=0,
        layers="last4",
    )
    rounds: list[tuple[float, float, float]] = []
    for _ in range(repeats):
        with torch.inference_mode(), policy.autocast():
            # bare forward: the model alone on a normalized batch already on the device
            bare = batch_size / timed(lambda: model.forward_features(xn), steps, policy.device)
        with tempfile.TemporaryDirectory() as cache:
            probekit.extract(model_name, predecoded(batch_size, size), cache_dir=cache, **kw)
            t = time.perf_counter()
            res = probekit.extract(model_name, ds, cache_dir=cache, **kw)
            pipe = n / (time.perf_counter() - t)
        assert not res.cache_hit
        with torch.inference_mode(), policy.autocast():
            # bare multi-layer forward: the same layers from timm directly, nothing else
            multi = batch_size / timed(
                lambda: model.forward_intermediates(xn, indices=layers, norm=True),
                steps,
                policy.device,
            )
        rounds.append((bare, multi, pipe))
    r = np.array(rounds)
    return {
        "model": model_name,
        "images": n,
        "repeats": repeats,
        "batch_size": batch_size,
        "device": policy.device,
        "precision": policy.precision,
        "bare_images_per_s": round(float(np.median(r[:, 0])), 1),
        "bare_multilayer_images_per_s": round(float(np.median(r[:, 1])), 1),
        "pipeline_images_per_s": round(float(np.median(r[:, 2])), 1),
        # each round times both sides back to back: the median of the per-round ratios
        # cancels the slow drifts of a shared machine
        "ratio": round(float(np.median(r[:, 2] / r[:, 0])), 3),
        "ratio_vs_multilayer": round(float(np.median(r[:, 2] / r[:, 1])), 3),
        "rounds": [[round(float(v), 1) for v in row] for row in rounds],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vit_tiny_patch16_224,resnet18")
    ap.add_argument("--images", default="1024,512", help="images per model (one, or one each)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    models = args.models.split(",")
    images = [int(n) for n in args.images.split(",")]
    images = images * len(models) if len(images) == 1 else images
    rows = [
        bench(m, n, args.batch_size, args.device, args.precision, args.repeats)
        for m, n in zip(models, images, strict=True)
    ]
    head = ("model", "bare img/s", "bare 4-layer img/s", "pipeline img/s", "ratio", "ratio 4-layer")
    print(f"{head[0]:14s}" + "".join(f"{h:>20s}" for h in head[1:]))
    for r in rows:
        print(
            f"{r['model']:14s}"
            + "".join(
                f"{r[k]:20.3f}" if "ratio" in k else f"{r[k]:20.1f}"
                for k in (
                    "bare_images_per_s",
                    "bare_multilayer_images_per_s",
                    "pipeline_images_per_s",
                    "ratio",
                    "ratio_vs_multilayer",
                )
            )
        )
    device = rows[0]["device"]
    name = torch.cuda.get_device_name() if device.startswith("cuda") else cpu_name()
    save_result(
        "bench_extract", device, name, {"threads": torch.get_num_threads(), "rows": rows}, args.out
    )


if __name__ == "__main__":
    main()
