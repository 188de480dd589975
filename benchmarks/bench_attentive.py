"""An attentive probe from the token cache against the usual loop, and streaming's memory.

1. Speed: one epoch of the same attentive probe (one configuration, same images, same batch)
   (a) from the token cache: tokens read from the store, head forward + backward + AdamW;
   (b) the usual loop of public implementations: every batch decoded and preprocessed, the
       frozen backbone run (no grad), then the same head step.
   The store is extracted first (not timed). Default: packaged EfficientNet-Lite0 (ImageNet
   weights) at 224 px, its last block's 7x7 map, on --images images of mnist5k.
2. Memory: `probekit.probe(method="attentive")` on a token store 4x larger than --memory-mb
   (the whole mnist5k token store, memory_mb a quarter of it), in a fresh process: peak RSS
   above the process's RSS before the probe starts (imports, store open), against the budget.

    python benchmarks/bench_attentive.py [--images 512 --batch-size 64 --device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import cpu_name, save_result

import probekit
from probekit.probes.attentive import train_attentive_heads

MODEL, DATA = "effnet_lite0", "mnist5k"


def cache_epoch(store, rows, y, shape, batch, device) -> float:  # type: ignore[no-untyped-def]
    from probekit.probes.rows import Rows

    t0 = time.perf_counter()
    t, d = shape
    x = torch.from_numpy(store.tokens("train", store.token_names[-1], rows)).to(device)
    x = Rows.of(x.reshape(1, len(rows), t * d))
    train_attentive_heads(x, y.to(device), 10, shape, (1e-3,), (0.01,), epochs=1, batch_size=batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def backbone_epoch(rows, y, shape, batch, device) -> float:  # type: ignore[no-untyped-def]
    """Decode + preprocess + frozen forward every batch, then the same head step."""
    from timm.data import create_transform, resolve_model_data_config

    from probekit.data import load_dataset
    from probekit.probes.attentive import AttentiveHeads, _init

    bb = probekit.specs.ModelSpec.parse(MODEL).create()
    model = bb.model.to(device).eval()
    tf = create_transform(**resolve_model_data_config(model))
    ds = load_dataset(DATA)
    t, d = shape
    params = _init(1, 1, t, d, 10, 1, True, 0, torch.float32, device)
    heads = AttentiveHeads(
        params,
        max(1, d // 64) if d % max(1, d // 64) == 0 else 1,
        *(np.zeros((1, 1)) for _ in range(3)),
    )
    opt = torch.optim.AdamW(list(params.values()), lr=1e-3, weight_decay=0.01)
    layer = bb.num_layers - 1
    t0 = time.perf_counter()
    for s in range(0, len(rows), batch):
        idx = rows[s : s + batch]
        x = torch.stack([tf(ds.load_image("train", int(i))) for i in idx]).to(device)
        with (
            torch.no_grad(),
            torch.autocast(device.type, enabled=device.type == "cuda", dtype=torch.bfloat16),
        ):
            (m,) = model.forward_intermediates(
                x, indices=[layer], norm=True, intermediates_only=True
            )
        tok = m.float().flatten(2).transpose(1, 2)[None]
        loss = torch.nn.functional.cross_entropy(
            heads.logits(tok)[0, 0], y[s : s + batch].to(device)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


MEMORY_CHILD = """
import json, resource, sys, torch
import probekit
torch.set_num_threads({threads})
store = probekit.open_store({path!r})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
res = probekit.probe(store, method="attentive", memory_mb={mb}, epochs=1, attn_lrs=[1e-3],
                     attn_wds=[0.01], device={device!r}, write=False)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"before_mib": before / 1024, "peak_mib": peak / 1024,
                   "streamed": bool(res.selected["attentive"].get("features_streamed")),
                   "test_top1": res.value("top1", method="attentive", split="test")}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args()
    device = torch.device(args.device)
    cache = args.cache_dir or tempfile.mkdtemp(prefix="probekit-bench-attentive-")
    res = probekit.extract(
        MODEL, DATA, layers="last", tokens="all", cache_dir=cache, device=args.device, quiet=True
    )
    store = probekit.open_store(res.store_path)
    name = store.token_names[-1]
    shape = store.token_shape(name)
    rows = np.arange(min(args.images, store.meta["splits"]["train"]))
    y = torch.from_numpy(store.labels("train")[rows])
    cache_s = min(cache_epoch(store, rows, y, shape, args.batch_size, device) for _ in range(3))
    loop_s = backbone_epoch(rows, y, shape, args.batch_size, device)
    speed = {
        "images": len(rows),
        "token_shape": list(shape),
        "batch_size": args.batch_size,
        "cache_epoch_s": round(cache_s, 3),
        "backbone_epoch_s": round(loop_s, 3),
        "speedup": round(loop_s / cache_s, 1),
    }
    print(json.dumps(speed))
    token_mib = (
        store.group[f"train/{name}"].nbytes / 2**20 + store.group[f"test/{name}"].nbytes / 2**20
    )
    mb = max(1, int(token_mib / 4))
    code = MEMORY_CHILD.format(
        path=res.store_path, mb=mb, device=args.device, threads=torch.get_num_threads()
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    mem = json.loads(run.stdout.strip().splitlines()[-1])
    mem.update(
        store_token_mib=round(token_mib, 1),
        memory_mb=mb,
        above_start_mib=round(mem["peak_mib"] - mem["before_mib"], 1),
    )
    print(json.dumps(mem))
    save_result(
        "bench_attentive",
        args.device,
        cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device),
        {"speed": speed, "memory": mem},
        args.out or Path(__file__).parent / "results",
    )


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    resource.setrlimit  # noqa: B018 - resource is imported for the child's measurement
    main()
