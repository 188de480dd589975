"""The box probe on digit-boxes at 224 px: test AP / AP50 of the packaged EfficientNet-Lite0
against its random init for each layer set (each of blocks 2, 3, 4 as a simple pyramid, and
the three as stages), the paired AP50 difference, the seconds an epoch of head training takes
from the cache against what an epoch would take rerunning the backbone over the same images
(its forward at the extraction loop's measured rate, plus the same head training), and each
probe's peak memory (RSS of a process that runs it alone).

    python benchmarks/bench_detect.py [--scenes 400] [--epochs 12] [--out DIR]
    python benchmarks/bench_detect.py --epochs-only   # one head's epoch: cache vs the usual loop

Each probe runs in its own process (its peak RSS is its own); rows go to the JSON file as
they are measured.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

from common import RESULTS, cpu_name, save_result

SETS = ("layer2/tokens", "layer3/tokens", "layer4/tokens", "stages")
METRICS = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large", "corloc")
BACKBONES = ("effnet_lite0", "effnet_lite0@random")
# backbones whose forward an epoch from the cache is also set against (random init: the same
# cost as their weights), with the layer their head reads
OTHERS = (("vit_small_patch16_224@random", "layer11/tokens"), ("resnet50@random", "layer3/tokens"))


def one(args: argparse.Namespace) -> dict[str, Any]:
    """One probe (a backbone, a layer set) in this process: its records, times, peak RSS."""
    import probekit
    from probekit.detection import probe as det_probe

    res = probekit.extract(
        args.backbone, f"digit-boxes:{args.scenes}", cache_dir=args.cache, quiet=True,
        tokens="all", layers=args.layers,
    )  # fmt: skip
    epochs: list[float] = []
    real = det_probe.train_box_heads

    def timed(*a: Any, **k: Any) -> Any:  # the grid's seconds an epoch, validation included
        t0 = time.perf_counter()
        out = real(*a, **k)
        epochs.append((time.perf_counter() - t0) / a[2].epochs)
        return out

    det_probe.train_box_heads = timed  # type: ignore[assignment]
    sets = "stages" if args.set == "stages" else "layers"
    features = None if args.set == "stages" else [args.set]
    t0 = time.perf_counter()
    out = probekit.probe(
        res.store_path, method="detect", det_sets=sets, features=features,
        det_epochs=args.epochs, write=True, out=args.records,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    store = probekit.open_store(res.store_path)
    values = {r.metric: r.value for r in out.records if r.split == "test"}
    (ap50,) = [r for r in out.records if r.split == "test" and r.metric == "ap50"]
    return {
        "ap50_record": ap50.to_dict(),
        "backbone": args.backbone,
        "set": args.set,
        "chosen": out.selected["detect"],
        "test": {
            k: values.get(k)
            for k in ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large", "corloc")
        },
        "probe_s": round(seconds, 2),
        "epoch_s": round(epochs[0], 3),
        "fit_images": int(store.usable("train").sum() * 0.9),
        "extract_images_per_s": store.meta.get("images_per_s"),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
    }


def head_epochs(cache: str, scenes: int) -> list[dict[str, Any]]:
    """One head configuration's epoch of training from the cache (no validation scoring), for
    a layer set of Lite0 (stages; block 3's pyramid) and of ViT-S/16 (block 11's pyramid),
    against the usual loop's epoch: every image decoded and run through the backbone (the
    extraction loop's rate without tokens), then the same head step."""
    import probekit
    from probekit.detection import probe as det_probe
    from probekit.detection.data import DetData, layer_sets, set_rows
    from probekit.probes.base import ProbeOptions

    out = []
    rates: dict[str, float] = {}
    cases = (
        ("effnet_lite0", "2,3,4", "stages"),
        ("effnet_lite0", "2,3,4", "layer3/tokens"),
        ("vit_small_patch16_224@random", "11", "layer11/tokens"),
    )
    for backbone, layers, label in cases:
        data_spec = f"digit-boxes:{scenes}"
        res = probekit.extract(backbone, data_spec, cache_dir=cache, quiet=True, tokens="all",
                               layers=layers)  # fmt: skip
        store = probekit.open_store(res.store_path)
        data = DetData.prepare(store, ProbeOptions.of(method="detect"))
        sets = layer_sets(store, (2.0, 1.0, 0.5))
        chosen = next(s for s in sets if s.label == label or (label == "stages" and not s.pyramid))
        x = set_rows(store, "train", chosen, data.fit_rows, 2**31, data.device)
        boxes = data.boxes("train", data.fit_rows)
        opts = det_probe.Options(lrs=(1e-3,), wds=(1e-4,), epochs=1)
        det_probe.train_box_heads(data, chosen, opts, x, boxes)  # warm
        t0 = time.perf_counter()
        det_probe.train_box_heads(data, chosen, replace_epochs(opts, 2), x, boxes)
        head = (time.perf_counter() - t0) / 2
        if backbone not in rates:  # a second extraction of the same store is a cache hit
            rates[backbone] = rate(backbone, cache, scenes)
        forward = len(data.fit_rows) / rates[backbone]
        out.append(
            {
                "backbone": backbone,
                "set": chosen.label,
                "images": len(data.fit_rows),
                "cache_epoch_s": round(head, 3),
                "loop_epoch_s": round(forward + head, 3),
                "speedup": round((forward + head) / head, 2),
            }
        )
        print(json.dumps(out[-1]))
    for backbone in ("resnet50@random", "vit_base_patch16_224@random"):
        r = rate(backbone, cache, 64)
        out.append({"backbone": backbone, "images_per_s": round(r, 2)})
        print(json.dumps(out[-1]))
    return out


def replace_epochs(opts: Any, epochs: int) -> Any:
    from dataclasses import replace

    return replace(opts, epochs=epochs)


def rate(backbone: str, cache: str, scenes: int) -> float:
    """The extraction loop's images/s of `backbone` at 224 px (its forward over the images)."""
    import probekit

    res = probekit.extract(
        backbone, f"digit-boxes:{scenes}", cache_dir=cache, quiet=True, layers="last"
    )
    return float(res.images_per_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=400)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument(
        "--epochs-only",
        action="store_true",
        help="only an epoch of one head from the cache against the usual loop",
    )
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--backbone", help=argparse.SUPPRESS)
    ap.add_argument("--set", help=argparse.SUPPRESS)
    ap.add_argument("--layers", default="2,3,4", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    ap.add_argument("--records", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args)))
        return
    if args.epochs_only:
        with tempfile.TemporaryDirectory() as tmp:
            rows = {"scenes": args.scenes, "epoch": head_epochs(f"{tmp}/cache", args.scenes)}
        save_result("bench_detect_epoch", "cpu", cpu_name(), rows, args.out)
        return
    rows: dict[str, Any] = {"scenes": args.scenes, "epochs": args.epochs, "probes": []}
    with tempfile.TemporaryDirectory() as tmp:
        cache, records = f"{tmp}/cache", f"{tmp}/records"
        for backbone in BACKBONES:
            for s in SETS:
                cmd = [sys.executable, __file__, "--one", "--backbone", backbone, "--set", s,
                       "--scenes", str(args.scenes), "--epochs", str(args.epochs),
                       "--cache", cache, "--records", records]  # fmt: skip
                done = subprocess.run(cmd, check=True, capture_output=True, text=True)
                row = json.loads(done.stdout.strip().splitlines()[-1])
                # an epoch rerunning the backbone: its forward over the fit images, then the
                # same head training
                forward = row["fit_images"] / row["extract_images_per_s"]
                row["rerun_epoch_s"] = round(forward + row["epoch_s"], 3)
                row["cache_speedup"] = round(row["rerun_epoch_s"] / row["epoch_s"], 2)
                rows["probes"].append(row)
                shown = ("backbone", "set", "test", "epoch_s", "rerun_epoch_s", "peak_rss_gib")
                print(json.dumps({k: row[k] for k in shown}))
                save_result("bench_detect", "cpu", cpu_name(), rows, args.out)
        rows["paired"] = paired(rows["probes"])
        heads = {r["set"]: r["epoch_s"] for r in rows["probes"] if r["backbone"] == BACKBONES[0]}
        fit = rows["probes"][0]["fit_images"]
        rows["other_backbones"] = [
            {
                "backbone": b,
                "images_per_s": (r := rate(b, cache, 64)),
                "forward_epoch_s": round(fit / r, 3),
                "head_epoch_s (Lite0's stride-16 pyramid, as a stand-in)": heads["layer3/tokens"],
                "cache_speedup": round(
                    (fit / r + heads["layer3/tokens"]) / heads["layer3/tokens"], 2
                ),
            }
            for b, _ in OTHERS
        ]
    save_result("bench_detect", "cpu", cpu_name(), rows, args.out)


def paired(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """AP50 of the packaged weights minus their random init's, per layer set, with the paired
    (basic bootstrap) interval the report gives."""
    from probekit.records import Record
    from probekit.report import build_report

    out = []
    for s in SETS:
        recs = [Record.from_dict(r["ap50_record"]) for r in rows if r["set"] == s]
        if len(recs) != 2:
            continue
        (d,) = build_report(recs, BACKBONES[1]).deltas
        out.append({"set": s, "delta_ap50": d["delta"], "paired_ci95": d["delta_ci95"]})
    return out


if __name__ == "__main__":
    main()
