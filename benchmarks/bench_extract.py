"""Images/s of the `probekit.extract` pipeline vs the bare model forward, in one run.

Sources (--source, comma list):
  synthetic  pre-decoded uint8 images already at the model's input size, in memory
  pixels     the pixel cache (built once beforehand, not timed): what every backbone after the
             first reads in a triage
  jpeg       a folder of JPEG photos (500x375, made from scikit-image's sample photos), decoded
             and resized by CPU workers (or on the GPU with --decode gpu)

For each model, source and compile setting the table shows: the bare forward (forward_features
on a normalized batch already on the device), the whole `extract` call (images/s with compile
time kept out), their ratio, the decode rate of the source, and an MFU estimate (FLOPs counted
by torch's FlopCounterMode on one forward, against the chip's dense bf16 peak). Where the
pipeline falls short, two more columns say why: the extractor's device work alone (a uint8
batch already on the device through normalization, forward_intermediates and pooling) and the
seconds the loop waited for input, for the device's queue and for storage.

--pixel-pair A,B: two backbones of one geometry over the same JPEG folder; B's extraction with
the pixel cache (built while A ran) against B decoding the JPEGs again. With --pixel-size N the
cache holds N px squares and B may have another geometry (its crop cut on the device).

    python benchmarks/bench_extract.py [--models vit_tiny_patch16_224,resnet18]
        [--source synthetic,pixels,jpeg] [--compile both] [--device cuda --batch-size 256]
    python benchmarks/bench_extract.py --pixel-pair mobilenetv3_large_100,mobilenetv3_small_100
    python benchmarks/bench_extract.py --pixel-pair mobilenetv3_large_100,resnet10t --pixel-size 256
"""

from __future__ import annotations

import argparse
import functools
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import RESULTS, cpu_name, save_result

import probekit
from probekit.backbones import create_backbone, parse_layers
from probekit.datasets import Dataset, Split, load_dataset
from probekit.extraction import (
    FeatureExtractor,
    default_workers,
    geometry_transform,
    keep_freed_memory,
    resolve_policy,
)
from probekit.extraction.sources import ImageSource, pass_batch

# dense bf16 peak of the chips a lent GPU may be (spec sheet, SXM)
PIXEL_READER = "process"  # who reads the pixel cache (--pixel-reader)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12}


@functools.cache
def predecoded(n: int, size: int, seed: int = 0) -> Dataset:
    """n random RGB images at exactly the model's input size: the geometry step is a no-op."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    labels = np.arange(n) % 10
    split = Split("train", tuple(f"img{i}" for i in range(n)), labels)
    return Dataset(
        f"bench:{n}x{size}:{seed}",
        f"bench-{n}x{size}-{seed}",
        tuple(map(str, range(10))),
        {"train": split},
        fingerprint=f"{n}-{size}-{seed}",
        arrays={"train": images},
        preprocessed=True,
    )


def jpeg_folder(root: Path, n: int) -> Path:
    """n JPEG photos of 500x375 (ImageNet's typical size): random crops, flips and colour
    shifts of scikit-image's sample photos, quality 90; two classes."""
    from PIL import Image
    from skimage import data

    photos = [
        data.astronaut(),
        data.coffee(),
        data.chelsea(),
        data.rocket(),
        data.immunohistochemistry(),
    ]
    rng = np.random.default_rng(0)
    for i in range(n):
        p = photos[i % len(photos)]
        h, w = p.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = p[y : y + ch, x : x + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        shifted = np.clip(crop.astype(np.int16) + rng.integers(-30, 30, size=3), 0, 255)
        d = root / "train" / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(shifted.astype(np.uint8)).resize((500, 375), Image.BICUBIC)
        img.save(d / f"{i}.jpg", quality=90)
    return root


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], steps: int, device: str, warmup: int = 2) -> float:
    """Seconds per call of fn after warm-up calls, with device syncs around the region."""
    for _ in range(warmup):
        fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t) / steps


def flops_per_image(model_name: str, img_size: int | None = None) -> float:
    """Forward FLOPs of one image (2 x MACs), counted by torch on the CPU in fp32."""
    from torch.utils.flop_counter import FlopCounterMode

    bb = create_backbone(model_name, random_init=True, img_size=img_size)
    size = tuple(bb.data_config["input_size"][1:])
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        bb.model.forward_features(torch.zeros(1, 3, *size))
    return float(counter.get_total_flops())


def decode_rate(ds: Dataset, model_name: str, workers: int, img_size: int | None = None) -> float:
    """Images/s of decoding + the model's resize/crop alone, with the extractor's workers."""
    bb = create_backbone(model_name, random_init=True, load=False, img_size=img_size)
    geo = geometry_transform(dict(bb.data_config))
    size = tuple(bb.data_config["input_size"][1:])
    src = ImageSource(ds, "train", geo, size)  # type: ignore[arg-type]
    n = len(src)
    batches = [list(range(i, min(n, i + 64))) for i in range(0, n, 64)]
    loader = torch.utils.data.DataLoader(
        src, batch_sampler=batches, collate_fn=pass_batch, num_workers=workers
    )
    t = time.perf_counter()
    for _ in loader:
        pass
    return n / (time.perf_counter() - t)


def bench(
    model_name: str,
    source: str,
    n: int,
    batch_size: int,
    device: str,
    precision: str,
    compile: bool,
    repeats: int,
    workers: int | None,
    jpegs: Path | None,
    decode: str,
    peak: float | None,
    flops: float,
    root: Path,
    chunk_rows: int = 1024,
    img_size: int | None = None,
) -> dict[str, Any]:
    """One row: bare forward and the whole `extract` from `source`; `root` holds the caches
    (a pixel store built by an earlier row of the same model is reused, untimed)."""
    policy = resolve_policy(device, precision)
    # None: extract's own defaults (every core builds the pixel cache; fewer decode beside a model)
    loop_workers = (
        default_workers("cuda" if policy.is_cuda else "cpu") if workers is None else workers
    )
    bb = create_backbone(model_name, random_init=True, img_size=img_size)
    size = int(bb.data_config["input_size"][-1])
    layers = list(parse_layers("last4", bb.num_layers))
    pools = ["cls", "mean"] if bb.has_class_token else ["mean"]
    # the extractor's own device work alone: uint8 batch already on the device -> normalize,
    # forward_intermediates, pooling (what `extract` runs, minus input, transfers and storage)
    fx = FeatureExtractor(bb, layers, pools, policy, compile=compile)
    x = torch.from_numpy(predecoded(batch_size, size).arrays["train"]).permute(0, 3, 1, 2)  # type: ignore[index]
    xn, xd = fx.normalize(x), x.to(policy.device)
    model: Any = bb.model
    fwd = (
        torch.compile(model.forward_features, dynamic=False) if compile else model.forward_features
    )
    steps = max(3, min(50, n // batch_size))
    kw: dict[str, Any] = dict(
        random_init=True,
        device=device,
        precision=precision,
        quiet=True,
        batch_size=batch_size,
        num_workers=workers,
        layers="last4",
        compile=compile,
        decode=decode,
        chunk_rows=chunk_rows,
        img_size=img_size,
    )
    try:
        if source == "jpeg":
            assert jpegs is not None
            ds: Dataset = load_dataset(f"imagefolder:{jpegs}")
            dec = decode_rate(ds, model_name, loop_workers, img_size)
            n = len(ds.splits["train"])
        else:
            ds, dec = predecoded(n, size), float("nan")
        if source == "pixels":  # build the pixel cache outside the timing
            from probekit.extraction.pixels import build_pixel_store

            geo = geometry_transform(dict(bb.data_config))
            pstore, _, _ = build_pixel_store(
                ds,
                geo,
                geo.describe(),
                (size, size),
                cache_dir=root,
                num_workers=default_workers("decode") if workers is None else workers,
                identity=geo.identity_ok,
            )
            dec = float(pstore.meta["images_per_s"])
        rounds, waits, loop_s = [], {}, 0.0
        for _ in range(repeats):
            with torch.inference_mode(), policy.autocast():
                bare = batch_size / timed(lambda: fwd(xn), steps, policy.device, warmup=3)
            device_only = batch_size / timed(lambda: fx(xd), steps, policy.device, warmup=3)
            res = probekit.extract(
                model_name,
                ds,
                cache_dir=root,
                pixel_cache=source == "pixels",
                pixel_reader=PIXEL_READER,
                overwrite=True,
                **kw,
            )
            assert not res.cache_hit
            whole = res.images / max(res.seconds - res.compile_seconds, 1e-9)
            rounds.append((bare, res.images_per_s, res.compile_seconds, whole, device_only))
            waits = res.waits
            loop_s = res.images / res.images_per_s if res.images_per_s > 0 else 0.0
    finally:
        for store in root.glob("*/*.zarr"):  # feature stores; pixel stores stay for the model
            shutil.rmtree(store, ignore_errors=True)
    arr = np.array(rounds)
    bare_med, pipe_med = float(np.median(arr[:, 0])), float(np.median(arr[:, 1]))
    return {
        "model": model_name,
        "img_size": size,
        "source": source,
        "decode": decode if source == "jpeg" else "-",
        "compile": compile,
        "images": n,
        "batch_size": batch_size,
        "chunk_rows": chunk_rows,
        "device": policy.device,
        "precision": policy.precision,
        "repeats": repeats,
        "workers": loop_workers,
        "pixel_reader": PIXEL_READER,
        "bare_images_per_s": round(bare_med, 1),
        "pipeline_images_per_s": round(pipe_med, 1),
        "ratio": round(float(np.median(arr[:, 1] / arr[:, 0])), 3),
        # the extractor's device work alone (normalize + intermediates + pooling, input on the
        # device): what the pipeline could reach with free input, transfers and storage
        "device_only_images_per_s": round(float(np.median(arr[:, 4])), 1),
        "pipeline_over_device_only": round(float(np.median(arr[:, 1] / arr[:, 4])), 3),
        # seconds the loop's host thread waited (last round): input, device queue, storage
        "waits_seconds": waits,
        # the loop's seconds (last round, the compiling batch apart) and how many of them its
        # thread was busy, not waiting; on a GPU (the device's work asynchronous), busy near
        # the loop's seconds means the host thread itself is the limit
        "loop_seconds": round(loop_s, 3),
        "loop_busy_seconds": round(loop_s - sum(waits.values()), 3),
        # the whole call (model and store set-up included, compile time apart) per image
        "call_images_per_s": round(float(np.median(arr[:, 3])), 1),
        "call_ratio": round(float(np.median(arr[:, 3] / arr[:, 0])), 3),
        "decode_images_per_s": None if np.isnan(dec) else round(dec, 1),
        "compile_seconds": round(float(arr[:, 2].max()), 1),
        "gflops_per_image": round(flops / 1e9, 3),
        "pipeline_tflops": round(pipe_med * flops / 1e12, 2),
        "mfu": None if peak is None else round(pipe_med * flops / peak, 4),
        "bare_mfu": None if peak is None else round(bare_med * flops / peak, 4),
        "rounds": [[round(float(v), 1) for v in row] for row in rounds],
    }


def pixel_pair(models: list[str], n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Backbone A decodes the JPEGs (building the pixel cache); B then decodes again, or reads
    the pixel cache: rounds alternate the two and time both whole `extract` calls. With
    `--pixel-size` the cache holds squares and B (of any centre-crop geometry) cuts its crop
    from them on the device: features close to decoding again, not identical."""
    a, b = models
    root = Path(tempfile.mkdtemp(prefix="probekit-pair-"))
    try:
        spec = f"imagefolder:{jpeg_folder(root / 'jpegs', n)}"
        kw: dict[str, Any] = dict(
            random_init=True,
            quiet=True,
            device=args.device,
            precision=args.precision,
            batch_size=args.batch_size,
            layers="last4",
            num_workers=args.workers,
        )
        shared = dict(cache_dir=root / "c", pixel_cache=True, pixel_size=args.pixel_size)
        kw = {**kw, "pixel_reader": PIXEL_READER}
        first = probekit.extract(a, spec, **shared, **kw)
        assert first.pixels.startswith("from the pixel cache") and "(built now" in first.pixels
        rounds, equal, cosines = [], True, []
        for _ in range(args.repeats):  # alternate: the machine's drifts hit both sides
            t = time.perf_counter()
            again = probekit.extract(b, spec, cache_dir=root / "plain", overwrite=True, **kw)
            t_plain = time.perf_counter() - t
            t = time.perf_counter()
            cached = probekit.extract(b, spec, overwrite=True, **shared, **kw)
            t_cached = time.perf_counter() - t
            assert cached.pixels.startswith("from the pixel cache") and "built" not in cached.pixels
            rounds.append((t_plain, t_cached))
            s1, s2 = probekit.open_store(again.store_path), probekit.open_store(cached.store_path)
            for name in s1.feature_names:
                f1, f2 = s1.features("train", name), s2.features("train", name)
                equal &= bool(np.array_equal(f1, f2))
                f1, f2 = f1.astype(np.float64), f2.astype(np.float64)
                cos = (f1 * f2).sum(1) / (np.linalg.norm(f1, axis=1) * np.linalg.norm(f2, axis=1))
                cosines.append(cos)
        r = np.array(rounds)
        return {
            "first": a,
            "second": b,
            "images": n,
            "jpeg": "500x375, quality 90",
            "pixel_size": args.pixel_size,
            "second_pixels": cached.pixels,
            "first_seconds_building_pixel_cache": round(first.seconds, 2),
            "second_decoding_again_s": round(float(np.median(r[:, 0])), 2),
            "second_from_pixel_cache_s": round(float(np.median(r[:, 1])), 2),
            "speedup": round(float(np.median(r[:, 0] / r[:, 1])), 2),
            "features_identical": equal,
            "features_min_cosine": round(float(np.concatenate(cosines).min()), 5),
            "features_mean_cosine": round(float(np.concatenate(cosines).mean()), 5),
            "rounds": [[round(float(v), 2) for v in row] for row in rounds],
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vit_tiny_patch16_224,resnet18")
    ap.add_argument("--source", default="synthetic,pixels", help="synthetic, pixels, jpeg")
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--compile", default="off", help="off, on, or both")
    ap.add_argument("--decode", default="cpu", help="jpeg source: cpu workers or gpu")
    ap.add_argument("--workers", type=int, default=None, help="[default: extract's own]")
    ap.add_argument("--chunk-rows", type=int, default=1024, help="rows per feature store chunk")
    ap.add_argument("--img-size", type=int, default=None, help="input size [default: the model's]")
    ap.add_argument("--pixel-pair", default=None, help="A,B: the pixel-cache comparison")
    ap.add_argument("--pixel-reader", default="process", help="process or threads")
    ap.add_argument("--pixel-size", type=int, default=None, help="--pixel-pair from squares")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--tag", default="", help="added to the result file's name")
    args = ap.parse_args()
    global PIXEL_READER
    PIXEL_READER = args.pixel_reader  # who reads the pixel cache

    device = resolve_policy(args.device, args.precision).device
    if not device.startswith("cuda"):
        keep_freed_memory()  # as `extract` does on a CPU: for the bare forward too, from the start
    name = torch.cuda.get_device_name() if device.startswith("cuda") else cpu_name()
    if args.pixel_pair:
        row = pixel_pair(args.pixel_pair.split(","), args.images, args)
        print(
            f"{row['second']} after {row['first']} over {row['images']} JPEGs: decoding again "
            f"{row['second_decoding_again_s']} s, from the pixel cache "
            f"{row['second_from_pixel_cache_s']} s: {row['speedup']}x, features identical: "
            f"{row['features_identical']} (cosine mean {row['features_mean_cosine']}, min "
            f"{row['features_min_cosine']})"
        )
        save_result(
            f"bench_pixel_cache-{row['second']}"
            + (f"-squares{args.pixel_size}" if args.pixel_size else ""),
            device,
            name,
            {"threads": torch.get_num_threads(), **row},
            args.out,
        )
        return
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    compiles = {"off": [False], "on": [True], "both": [True, False]}[args.compile]
    sources = args.source.split(",")
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="probekit-jpegs-"))
    jpegs = jpeg_folder(tmp, args.images) if "jpeg" in sources else None
    out_name = "bench_extract" if not device.startswith("cuda") else "bench_extract_gpu"
    out_name += f"-{args.tag}" if args.tag else ""
    try:
        for m in args.models.split(","):
            flops = flops_per_image(m, args.img_size)
            root = Path(tempfile.mkdtemp(prefix="probekit-bench-"))
            for c in compiles:
                for src in sources:
                    rows.append(
                        bench(
                            m,
                            src,
                            args.images,
                            args.batch_size,
                            args.device,
                            args.precision,
                            c,
                            args.repeats,
                            args.workers,
                            jpegs,
                            args.decode,
                            peak,
                            flops,
                            root,
                            args.chunk_rows,
                            args.img_size,
                        )
                    )
                    r = rows[-1]
                    print(
                        f"{m:24s} {src:9s} compile={c!s:5s} bare {r['bare_images_per_s']:9.1f} "
                        f"pipeline {r['pipeline_images_per_s']:9.1f} ratio {r['ratio']:.3f} "
                        f"(whole call {r['call_ratio']:.3f}) "
                        f"device-only {r['device_only_images_per_s']:.1f} "
                        f"waits {r['waits_seconds']} busy {r['loop_busy_seconds']} of "
                        f"{r['loop_seconds']} s "
                        f"decode {r['decode_images_per_s']} MFU {r['mfu']} "
                        f"(compile {r['compile_seconds']} s)",
                        flush=True,
                    )
                    save_result(out_name, device, name, {"peak_bf16": peak, "rows": rows}, args.out)
            shutil.rmtree(root, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    head = (
        "model",
        "source",
        "compile",
        "bare img/s",
        "pipeline img/s",
        "ratio",
        "decode img/s",
        "MFU",
    )
    print(" | ".join(head))
    for r in rows:
        print(
            " | ".join(
                str(v)
                for v in (
                    r["model"],
                    r["source"],
                    r["compile"],
                    r["bare_images_per_s"],
                    r["pipeline_images_per_s"],
                    r["ratio"],
                    r["decode_images_per_s"],
                    r["mfu"],
                )
            )
        )


if __name__ == "__main__":
    main()
