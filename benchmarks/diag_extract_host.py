"""Where the extraction loop's host time goes: the same `extract` with parts of the host side
taken out, and a sampling profile of the loop's thread.

On a GPU the loop's one Python thread must feed the device faster than it computes. This runs
one model (compiled) over pre-decoded images from memory ("synthetic") and from the pixel
cache, and repeats each run with the chunk writes removed (chunks never reach the writer
process: its buffer is handed back at once), with the device's work removed (the extractor
returns the same features for every batch: what the host side alone can feed), with the pixel
cache read by threads of the loop's process instead of the reader process, with a smaller GIL
switch interval, and with 2 reader threads instead of the default. A run whose
features are not written or not computed is a diagnosis, never a result: its store is
discarded.

    python benchmarks/diag_extract_host.py --model vit_small_patch16_224 --images 32768
    python benchmarks/diag_extract_host.py --only "no device work" --eager --images 16384  # CPU
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from bench_extract import predecoded
from common import RESULTS, cpu_name, save_result

import probekit
from probekit.backbones import create_backbone
from probekit.cache.writer import ChunkBuffer, ChunkWriter
from probekit.extraction.pixels import build_pixel_store

extract_module = importlib.import_module("probekit.extraction")


class Sampler(threading.Thread):
    """Every 0.5 ms: the main thread's innermost frame, and its innermost probekit frame."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.main = threading.main_thread().ident
        self.inner: collections.Counter[str] = collections.Counter()
        self.ours: collections.Counter[str] = collections.Counter()
        self.stop, self.n = False, 0

    def run(self) -> None:
        while not self.stop:
            f = sys._current_frames().get(self.main or 0)
            if f is not None:
                self.n += 1
                code = f.f_code
                self.inner[f"{os.path.basename(code.co_filename)}:{f.f_lineno} {code.co_name}"] += 1
                g: Any = f
                while g is not None and f"{os.sep}probekit{os.sep}" not in g.f_code.co_filename:
                    g = g.f_back
                if g is not None:
                    name = f"{os.path.basename(g.f_code.co_filename)}:{g.f_lineno}"
                    self.ours[f"{name} {g.f_code.co_name}"] += 1
            time.sleep(0.0005)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--images", type=int, default=32768)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--only", default="", help="runs whose name has one of these (comma list)")
    ap.add_argument("--eager", action="store_true", help="no torch.compile (a CPU's host side)")
    ap.add_argument("--show", action="store_true", help="print the sampled probekit frames")
    args = ap.parse_args()
    only = [s for s in args.only.split(",") if s]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bb = create_backbone(args.model, random_init=True, load=False)
    size = int(bb.data_config["input_size"][-1])
    ds = predecoded(args.images, size)
    root = Path(tempfile.mkdtemp(prefix="probekit-diag-"))
    geo = extract_module.geometry_transform(dict(bb.data_config))
    build_pixel_store(
        ds, geo, geo.describe(), (size, size), cache_dir=root, identity=geo.identity_ok
    )
    rows: list[dict[str, Any]] = []

    def run(name: str, pixels: bool, patch: str = "", swi: float = 0.0, **kw: Any) -> None:
        if only and not any(s in name for s in only):
            return
        undo: list[Callable[[], None]] = []
        if "no chunk writes" in patch:
            real = ChunkWriter.submit

            def unsent(self: ChunkWriter, buf: ChunkBuffer, *a: Any, **k: Any) -> None:
                self._free.append(buf.slot)

            ChunkWriter.submit = unsent  # type: ignore[method-assign]
            undo.append(lambda: setattr(ChunkWriter, "submit", real))
        if "no device" in patch:
            fx_class = extract_module.FeatureExtractor
            real_call = fx_class.__call__
            outputs: dict[int, Any] = {}

            def same_features(self: Any, batch: torch.Tensor) -> Any:
                b = batch.shape[0]
                if b not in outputs and args.eager:  # one image's features for every row: an
                    # eager CPU forward of a whole batch would outweigh the host side measured
                    one = real_call(self, batch[:1])
                    outputs[b] = {k: v.expand(b, *v.shape[1:]).contiguous() for k, v in one.items()}
                elif b not in outputs:  # the compiled graph takes whole batches only
                    outputs[b] = real_call(self, batch)
                return outputs[b]

            fx_class.__call__ = same_features
            undo.append(lambda: setattr(fx_class, "__call__", real_call))
        if "reader threads" in patch:  # the pixel cache read by threads of this process
            kw["pixel_reader"] = "threads"
        old = sys.getswitchinterval()
        if swi:
            sys.setswitchinterval(swi)
        sampler = Sampler() if kw.pop("sample", False) else None
        if sampler:
            sampler.start()
        try:
            res = probekit.extract(
                args.model,
                ds,
                random_init=True,
                device=device,
                quiet=True,
                batch_size=args.batch_size,
                layers="last4",
                compile=not args.eager,
                cache_dir=root,
                pixel_cache=pixels,
                overwrite=True,
                **kw,
            )
        finally:
            sys.setswitchinterval(old)
            for u in undo:
                u()
            if sampler:
                sampler.stop = True
                sampler.join()
        row: dict[str, Any] = {
            "run": name,
            "images_per_s": round(res.images_per_s, 1),
            "compile_seconds": round(res.compile_seconds, 1),
            "waits_seconds": res.waits,
        }
        if sampler:  # shares of the whole call (model set-up included), not only the loop
            row["main_thread_innermost"] = [
                (k, round(v / sampler.n, 4)) for k, v in sampler.inner.most_common(30)
            ]
            row["main_thread_probekit_frame"] = [
                (k, round(v / sampler.n, 4)) for k, v in sampler.ours.most_common(30)
            ]
        print(json.dumps({k: v for k, v in row.items() if not k.startswith("main")}), flush=True)
        if sampler and args.show:
            for k, v in row["main_thread_probekit_frame"][:12]:
                print(f"    {v:7.4f}  {k}")
        rows.append(row)
        name_dev = torch.cuda.get_device_name() if device == "cuda" else cpu_name()
        save_result(
            f"diag_extract_host-{args.model}",
            device,
            name_dev,
            {
                "images": args.images,
                "batch_size": args.batch_size,
                "compile": not args.eager,
                "runs": rows,
            },
            args.out,
        )

    try:
        # the comparisons that matter first: the list may be cut short by a time limit
        run("pixels, warm-up (compiles)", True)
        run("pixels", True)
        run("pixels, reader threads", True, "reader threads")
        run("synthetic", False)
        run("pixels, no chunk writes", True, "no chunk writes")
        run("pixels, reader threads, no chunk writes", True, "reader threads, no chunk writes")
        run("synthetic, no chunk writes", False, "no chunk writes")
        run("pixels, no device work", True, "no device")
        run("pixels, reader threads, no device work", True, "reader threads, no device")
        run("synthetic, no device work", False, "no device")
        run("pixels, no device work, no chunk writes", True, "no device, no chunk writes")
        run(
            "pixels, reader threads, no device work, no chunk writes",
            True,
            "reader threads, no device, no chunk writes",
        )
        run("pixels, sampled", True, sample=True)
        run("pixels, no device work (sampled)", True, "no device", sample=True)
        run("synthetic, sampled", False, sample=True)
        run("pixels, switch interval 0.5 ms", True, swi=0.0005)
        run("pixels, 2 reader threads", True, num_workers=2)
    finally:  # the pixel store and the feature stores: gigabytes at full size
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
