"""An attentive probe from the token cache against the usual loop, and streaming's memory.

1. Speed: one epoch of the same attentive probe (one configuration, same images, same batch)
   (a) from the token cache: tokens read from the store, head forward + backward + AdamW;
   (b) the usual loop of public implementations: every batch decoded and preprocessed, the
       frozen backbone run (no grad), then the same head step.
   The store is extracted first (not timed). Default: packaged EfficientNet-Lite0 (ImageNet
   weights) at 224 px, its last block's 7x7 map, on --images images of mnist5k.
2. Memory: `probekit.probe(method="attentive")` on a token store 4x larger than --memory-mb
   (the whole mnist5k token store, memory_mb a quarter of it, then half of it), each in a
   fresh process: the peak RSS (VmHWM, reset when the probe starts) above the RSS then
   (imports, store open). Against it, the model: the peak of the same probe's training steps
   and scoring blocks on random tokens held in memory (one batch), less those tokens.

    python benchmarks/bench_attentive.py [--images 512 --batch-size 64 --device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
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

    from probekit.datasets import load_dataset
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


CHILD_HEAD = """
import json, numpy as np, torch
import probekit, probekit.probes
import scipy.stats, sklearn.model_selection  # the probe's lazy imports: not its memory

def status(key):  # kB, from /proc/self/status
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

torch.set_num_threads({threads})
torch.ones(64, 64).sum()
"""

PROBE_CHILD = (
    CHILD_HEAD
    + """
store = probekit.open_store({path!r})
open("/proc/self/clear_refs", "w").write("5")  # the peak RSS starts again from now
before = status("VmRSS")
res = probekit.probe(store, method="attentive", memory_mb={mb}, epochs=1, attn_lrs=[1e-3],
                     attn_wds=[0.01], device={device!r}, write=False)
peak = status("VmHWM")
print(json.dumps({{"above_start_mib": (peak - before) / 1024,
                   "batch_size": res.selected["attentive"]["batch_size"],
                   "streamed": bool(res.selected["attentive"].get("features_streamed")),
                   "test_top1": res.value("top1", method="attentive", split="test")}}))
"""
)

MODEL_CHILD = (
    CHILD_HEAD
    + """
from probekit.probes.attentive import _score_rows, train_attentive_heads
t, d, b = {t}, {d}, {batch}
x = torch.randn(1, b, t * d).half()
xv = torch.randn(1, _score_rows(t, d), t * d).half()
y, yv = torch.randint(0, 10, (b,)), torch.randint(0, 10, (xv.shape[1],))
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS")
train_attentive_heads(x, y, 10, (t, d), [1e-3], [0.01], epochs=2, batch_size=b, x_val=xv,
                      y_val=yv)
print(json.dumps({{"model_mib": (status("VmHWM") - before) / 1024}}))
"""
)


def child(code: str, **env: str) -> dict:  # type: ignore[type-arg]
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env},
    )
    return json.loads(run.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


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
    threads = torch.get_num_threads()
    runs = {
        f"memory_mb={m}": child(
            PROBE_CHILD.format(path=res.store_path, mb=m, device=args.device, threads=threads)
        )
        for m in (mb, 2 * mb)
    }
    t, d = shape
    batch = runs[f"memory_mb={mb}"]["batch_size"]
    model = child(MODEL_CHILD.format(t=t, d=d, batch=batch, threads=threads))["model_mib"]
    mem = {"store_token_mib": round(token_mib, 1), "model_mib": round(model, 1), "runs": runs}
    for m, run in zip((mb, 2 * mb), runs.values(), strict=True):
        run["above_start_mib"] = round(run["above_start_mib"], 1)
        run["beyond_budget_and_model_mib"] = round(run["above_start_mib"] - m - model, 1)
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
    main()
