"""First-pass JPEG decoding on the CPU: probekit's decode workers against a bare loop, and what
reduced-size DCT decoding (PIL's `draft`) would buy and cost.

Files: scikit-image's real photos, re-encoded as JPEG (quality 90) at 500x375 (ImageNet-like)
and at 4000x3000 (a camera's), seeded crops and flips so no two files are alike.
Geometry: ViT-S/16's eval transform (resize the short side to 248, bicubic; centre crop 224).

1. bare: one process, a plain loop: PIL open, convert to RGB, the geometry, as uint8.
2. workers: probekit's `ImageSource` batches (the path `extract` takes), in a torch DataLoader
   with 1 and with 2 worker processes (each keeping freed memory, `decode_worker_init`), against
   bare in a default process and bare with the same heap policy (goal: one worker >= 0.85 of
   bare, two >= 1.7x one).
3. encoded: the host side of `--decode gpu`: `EncodedSource` batches (each batch's JPEG bytes
   in one tensor) through a DataLoader with 1 and 2 workers, against a bare loop that reads the
   files; and the device's side: `decode_on_device` (batched nvJPEG, then the geometry once per
   source size) on batches of 256, its speed and its features' cosine to the default decoding
   (on a CPU, torchvision's libjpeg stands in for nvJPEG).
4. draft: the bare loop with `Image.draft("RGB", size)` first (libjpeg decodes at 1/2, 1/4 or
   1/8 scale where the resize target is at most that), its speed and how far its pixels (mean
   absolute difference) and its features (cosine, packaged EfficientNet-Lite0, pooled last
   block) are from the default decoding. probekit's decoding stays the default, exact one.

    python benchmarks/bench_decode.py [--small 256 --large 32] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import cpu_name, save_result
from PIL import Image

from probekit._malloc import keep_freed_memory, return_freed_memory
from probekit.datasets.common import Dataset, Split, to_rgb
from probekit.datasets.common import digest as _digest
from probekit.extraction.preprocess import geometry_transform
from probekit.extraction.sources import (
    EncodedSource,
    ImageSource,
    decode_on_device,
    decode_worker_init,
    pass_batch,
)

GEOMETRY = {"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 0.9}


def make_files(folder: Path, n: int, size: tuple[int, int], seed: int) -> list[str]:
    from skimage import data as skdata

    photos = [
        getattr(skdata, name)()
        for name in ("coffee", "chelsea", "astronaut", "rocket", "immunohistochemistry")
    ]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    w, h = size
    for i in range(n):
        photo = Image.fromarray(photos[i % len(photos)])
        # a seeded crop of 60-100% of the photo, maybe flipped, to the target size
        s = rng.uniform(0.6, 1.0)
        cw, ch = int(photo.width * s), int(photo.height * s)
        x, y = (
            int(rng.integers(0, photo.width - cw + 1)),
            int(rng.integers(0, photo.height - ch + 1)),
        )
        img = photo.crop((x, y, x + cw, y + ch)).resize((w, h), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        path = folder / f"{i:05d}.jpg"
        img.save(path, quality=90)
        paths.append(str(path))
    return paths


def bare(paths: list[str], geometry: object, draft: bool = False) -> tuple[float, np.ndarray]:
    out = np.empty((len(paths), 224, 224, 3), np.uint8)
    t0 = time.perf_counter()
    for i, p in enumerate(paths):
        with Image.open(p) as im:
            if draft:
                im.draft("RGB", (224, 224))  # the largest 1/2^k scale still >= the target
            im.load()
            rgb = to_rgb(im)
        out[i] = np.asarray(geometry(rgb), dtype=np.uint8)  # type: ignore[operator]
    return len(paths) / (time.perf_counter() - t0), out


def folder(paths: list[str]) -> Dataset:
    return Dataset(
        "bench",
        "bench",
        ("photo",),
        {"train": Split("train", tuple(paths), np.zeros(len(paths), np.int64))},
        _digest(*paths),
    )


def workers(paths: list[str], geometry: object, n_workers: int, encoded: bool = False) -> float:
    """Images/s of `extract`'s decoding loader (or, `encoded`, of its `--decode gpu` loader:
    the files' bytes) after its first batch."""
    ds = folder(paths)
    source: torch.utils.data.Dataset = (
        EncodedSource(ds, "train") if encoded else ImageSource(ds, "train", geometry, (224, 224))  # type: ignore[arg-type]
    )
    batch = max(1, min(256 if encoded else 32, len(paths) // 8))  # a few batches after the first
    batches = [list(range(s, min(s + batch, len(paths)))) for s in range(0, len(paths), batch)]
    loader = torch.utils.data.DataLoader(  # as `extract` makes its decoding loader
        source,
        batch_sampler=batches,
        collate_fn=pass_batch,
        num_workers=n_workers,
        worker_init_fn=decode_worker_init,
    )
    it = iter(loader)
    first = next(it)  # workers started and warm: timed from the second batch
    t0 = time.perf_counter()
    n = 0
    for _, valid, _ in it:
        n += len(valid)
    del first
    return n / (time.perf_counter() - t0)


def read_bytes(paths: list[str]) -> float:
    """Images/s of a bare loop reading the files (what an encoded batch holds)."""
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb") as f:
            f.read()
    return len(paths) / (time.perf_counter() - t0)


def device_decode(paths: list[str], geometry: object, device: str) -> tuple[float, np.ndarray]:
    """Images/s of `decode_on_device` on batches of up to 256 (bytes already read), and its
    images (N, 224, 224, 3) on the host."""
    source = EncodedSource(folder(paths), "train")
    size = min(256, len(paths))
    batches = [
        source.__getitems__(list(range(s, min(s + size, len(paths)))))
        for s in range(0, len(paths), size)
    ]

    def run() -> list[torch.Tensor]:
        return [decode_on_device(*b, geometry, (224, 224), device)[0] for b in batches]  # type: ignore[arg-type]

    run()  # warm-up: nvJPEG's handles, the kernels
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = run()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    rate = len(paths) / (time.perf_counter() - t0)
    return rate, torch.cat(out).permute(0, 2, 3, 1).cpu().numpy()


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    fa, fb = features(a[:64]), features(b[:64])
    return (fa * fb).sum(1) / (np.linalg.norm(fa, axis=1) * np.linalg.norm(fb, axis=1))


def features(images: np.ndarray) -> np.ndarray:
    import probekit

    bb = probekit.specs.ModelSpec.parse("effnet_lite0").create()
    model = bb.model.eval()
    mean = torch.tensor(model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg["std"]).view(1, 3, 1, 1)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.inference_mode():
        return model.forward_head(model.forward_features(x), pre_logits=True).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=256, help="files at 500x375")
    ap.add_argument("--large", type=int, default=32, help="files at 4000x3000")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    geometry = geometry_transform(GEOMETRY)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="probekit-bench-decode-") as tmp:
        for label, size, n in (
            ("500x375", (500, 375), args.small),
            ("4000x3000", (4000, 3000), args.large),
        ):
            paths = make_files(Path(tmp) / label, n, size, seed=0)
            bare(paths[:8], geometry)  # warm-up
            rate, exact = bare(paths, geometry)
            one = workers(paths, geometry, 1)
            two = workers(paths, geometry, 2)
            keep_freed_memory()  # bare again, under the decode workers' heap policy
            kept, _ = bare(paths, geometry)
            return_freed_memory()  # glibc's thresholds set back near their defaults
            d_rate, drafted = bare(paths, geometry, draft=True)
            cos = cosines(exact, drafted)
            read = read_bytes(paths)
            enc_one = workers(paths, geometry, 1, encoded=True)
            enc_two = workers(paths, geometry, 2, encoded=True)
            dev_rate, on_device = device_decode(paths, geometry, args.device)
            dev_cos = cosines(exact, on_device)
            rows[label] = {
                "files": n,
                "bare_img_s": round(rate, 1),
                "one_worker_img_s": round(one, 1),
                "one_worker_vs_bare": round(one / rate, 3),
                "bare_kept_img_s": round(kept, 1),
                "one_worker_vs_bare_kept": round(one / kept, 3),
                "two_workers_img_s": round(two, 1),
                "two_vs_one": round(two / one, 3),
                "draft_img_s": round(d_rate, 1),
                "draft_vs_bare": round(d_rate / rate, 2),
                "draft_pixel_mad": round(float(np.abs(exact.astype(int) - drafted).mean()), 2),
                "draft_feature_cosine_mean": round(float(cos.mean()), 4),
                "draft_feature_cosine_min": round(float(cos.min()), 4),
                "read_bytes_img_s": round(read, 1),
                "encoded_one_worker_img_s": round(enc_one, 1),
                "encoded_two_workers_img_s": round(enc_two, 1),
                "decode_device": args.device,
                "device_decode_img_s": round(dev_rate, 1),
                "device_decode_pixel_mad": round(
                    float(np.abs(exact.astype(int) - on_device).mean()), 2
                ),
                "device_decode_feature_cosine_mean": round(float(dev_cos.mean()), 4),
                "device_decode_feature_cosine_min": round(float(dev_cos.min()), 4),
            }
            print(label, json.dumps(rows[label]))
    save_result(
        "bench_decode",
        "cpu",
        cpu_name() + ("" if args.device == "cpu" else f" + {torch.cuda.get_device_name()}"),
        {"geometry": "resize 248 bicubic, centre crop 224", "rows": rows},
        args.out or Path(__file__).parent / "results",
    )


if __name__ == "__main__":
    main()
