"""Dense probes on the built-in dense dataset: the packaged EfficientNet-Lite0 against its own
random init, by linear segmentation and dense kNN on cached patch tokens.

For each backbone: `probekit.extract` (--layers, all tokens) on digit-scenes (400 scenes: 300
train, of which a tenth is the validation holdout, and 100 test), then `probekit.probe` with
linseg and dense-knn (layer, lr, wd, epoch, k chosen on validation). Reported: test mIoU and
pixel accuracy with intervals over test images, seconds, and the pretrained-minus-random
difference with a paired interval that resamples test images (`paired_dense_delta`).

    python benchmarks/bench_dense.py [--layers last3 --device cpu]
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

import probekit
from probekit.segmentation import paired_dense_delta

DATA = "digit-scenes"
MODELS = ("effnet_lite0", "effnet_lite0@random")
METHODS = ("linseg", "dense-knn")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="last3")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args()
    cache = args.cache_dir or tempfile.mkdtemp(prefix="probekit-bench-dense-")
    runs: dict[str, dict] = {}  # type: ignore[type-arg]
    counts: dict[tuple[str, str], np.ndarray] = {}
    for model in MODELS:
        t0 = time.perf_counter()
        ext = probekit.extract(
            model,
            DATA,
            layers=args.layers,
            tokens="all",
            cache_dir=cache,
            device=args.device,
            quiet=True,
        )
        t1 = time.perf_counter()
        res = probekit.probe(
            ext.store_path, method=",".join(METHODS), device=args.device, write=False
        )
        t2 = time.perf_counter()
        row: dict = {"extract_s": round(t1 - t0, 1), "probe_s": round(t2 - t1, 1)}  # type: ignore[type-arg]
        for r in res.records:
            if r.split == "test":
                row[f"{r.method} {r.metric}"] = [
                    round(r.value, 4),
                    *(round(v, 4) for v in r.extra["ci95"]),
                ]
                if r.metric == "miou":
                    counts[(model, r.method)] = np.array(r.extra["class_counts"])
        for m in METHODS:
            sel = res.selected[m]
            row[f"{m} chosen"] = {
                k: sel[k] for k in ("feature", "lr", "wd", "epoch", "k") if k in sel
            }
        runs[model] = row
        print(model, json.dumps(row))
    deltas = {}
    for m in METHODS:
        d = paired_dense_delta(counts[(MODELS[0], m)], counts[(MODELS[1], m)])
        deltas[m] = {k: [round(x, 4) for x in v] for k, v in d.items()}
        print(f"{m}: pretrained - random", json.dumps(deltas[m]))
    device = torch.device(args.device)
    save_result(
        "bench_dense",
        args.device,
        cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device),
        {"data": DATA, "layers": args.layers, "runs": runs, "pretrained_minus_random": deltas},
        args.out or Path(__file__).parent / "results",
    )


if __name__ == "__main__":
    main()
