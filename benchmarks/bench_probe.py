"""Probe speed on this machine, in one run.

1. Logistic regression over a C path: probekit.probe (L-BFGS in torch, warm starts along the
   path, C chosen on a 10% holdout, refit on train + holdout) vs a scikit-learn loop over the
   same C values (LogisticRegression(solver="lbfgs") fit from scratch for each C on the same
   standardized features, same holdout). Same chosen C? Test accuracy within 0.3 points?
   Timed warm (the second call; the first, with its one-time imports, reported beside it).
2. G = 4 layers x 13 lr x 2 wd = 104 linear heads trained together (one batched matmul per
   feature and minibatch) vs the same heads trained one by one (same epochs, batches, seed):
   by probekit's own code with one head (the same fused step), in paired rounds, and in a
   standard PyTorch loop (nn.Linear, torch.optim.SGD, cross_entropy, autograd), once.

    python benchmarks/bench_probe.py [--n 20000 --dim 384 --classes 10 --epochs 10]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, cpu_name, save_result

from probekit.cache.store import FeatureStore, StoreConfig
from probekit.probes import DEFAULT_CS, DEFAULT_LRS, holdout_split, probe, train_linear_heads


def features(rng: np.random.Generator, n: int, dim: int, classes: int, centers: np.ndarray):
    y = rng.integers(0, classes, n)
    return (centers[y] + rng.normal(size=(n, dim))).astype(np.float32), y


def write_store(path: Path, splits: dict, classes: int, names: list[str]) -> FeatureStore:
    dim = next(iter(splits.values()))[0][0].shape[1]
    cfg = StoreConfig("bench", "bench", "-", {}, (), (), "float32", "fp32")
    meta = {
        "dataset": {"spec": "bench", "fingerprint": "-"},
        "backbone": {"name": "bench"},
        "weights": {"source": "-"},
        "class_names": [str(i) for i in range(classes)],
    }
    n = max(len(v[1]) for v in splits.values())
    store = FeatureStore.create(
        path,
        cfg,
        meta,
        {s: len(v[1]) for s, v in splits.items()},
        dict.fromkeys(names, dim),
        n,
        set(),
    )
    for s, (xs, y) in splits.items():
        cols = {name: x for name, x in zip(names, xs, strict=True)}
        store.write_chunk(
            s,
            0,
            n,
            {
                **cols,
                "labels": y,
                "valid": np.ones(len(y), bool),
                "ids": np.array([str(i) for i in range(len(y))]),
                "errors": np.array([""] * len(y)),
            },
        )
    store.update_meta(status="complete")
    return store


def logreg_path(n: int, dim: int, classes: int) -> dict:
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(classes, dim)).astype(np.float32) * 0.12
    x, y = features(rng, n, dim, classes, centers)
    xt, yt = features(rng, n // 4, dim, classes, centers)
    with tempfile.TemporaryDirectory() as tmp:
        store = write_store(
            Path(tmp) / "s.zarr", {"train": ([x], y), "test": ([xt], yt)}, classes, ["head/embed"]
        )
        # the first call in a process also pays one-time imports and warm-ups; the second is
        # what every further probe costs. scikit-learn's side is warmed up too (a small fit).
        t = time.perf_counter()
        probe(store, method="logreg", write=False)
        t_cold = time.perf_counter() - t
        t = time.perf_counter()
        res = probe(store, method="logreg", write=False)
        t_ours = time.perf_counter() - t
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        LogisticRegression(max_iter=5).fit(x[:100], y[:100])
    ours_c = res.selected["logreg"]["C"]
    ours_acc = res.value("top1", method="logreg")
    # scikit-learn, as a user would loop over the same C values
    t = time.perf_counter()
    fit, val = holdout_split(y, 0.1, 0)
    mean, std = x[fit].astype(np.float64).mean(0), x[fit].astype(np.float64).std(0)
    z = ((x - mean) / std).astype(np.float32)
    zt = ((xt - mean) / std).astype(np.float32)
    best = (-1.0, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning at large C, as users see it
        for c in DEFAULT_CS:
            clf = LogisticRegression(C=c, solver="lbfgs", max_iter=1000).fit(z[fit], y[fit])
            acc = clf.score(z[val], y[val])
            if acc > best[0]:
                best = (acc, c)
        clf = LogisticRegression(C=best[1], solver="lbfgs", max_iter=1000).fit(z, y)
    sk_acc = clf.score(zt, yt)
    t_sk = time.perf_counter() - t
    return {
        "n": n,
        "dim": dim,
        "classes": classes,
        "n_C": len(DEFAULT_CS),
        "probekit_s": round(t_ours, 2),
        "probekit_first_call_s": round(t_cold, 2),
        "sklearn_s": round(t_sk, 2),
        "speedup": round(t_sk / t_ours, 2),
        "speedup_first_call": round(t_sk / t_cold, 2),
        "probekit_C": ours_c,
        "sklearn_C": best[1],
        "probekit_top1": ours_acc,
        "sklearn_top1": sk_acc,
    }


def heads(n: int, dim: int, classes: int, epochs: int, rounds: int) -> dict:
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(classes, dim)).astype(np.float32) * 0.12
    y_np = rng.integers(0, classes, n)
    # four "layers" of the same images: one label vector, four feature matrices
    xs = torch.stack(
        [
            torch.from_numpy((centers[y_np] + rng.normal(size=(n, dim))).astype(np.float32))
            for _ in range(4)
        ]
    )
    y = torch.from_numpy(y_np)
    wds = [0.0, 1e-4]
    kw: dict = dict(epochs=epochs, batch_size=256, seed=0, y_val=y[: n // 10])
    # paired rounds (batched, then one by one): this machine's speed drifts between minutes
    t_batched, t_alone = [], []
    worst = 0.0
    for _ in range(rounds):
        t = time.perf_counter()
        batched = train_linear_heads(xs, y, classes, DEFAULT_LRS, wds, x_val=xs[:, : n // 10], **kw)
        t_batched.append(time.perf_counter() - t)
        t = time.perf_counter()
        for li in range(4):
            for i, (lr, wd) in enumerate([(lr, wd) for lr in DEFAULT_LRS for wd in wds]):
                alone = train_linear_heads(
                    xs[li], y, classes, [lr], [wd], x_val=xs[li, : n // 10], **kw
                )
                diff = (alone.weight[0, :, 0] - batched.weight[li, :, i]).abs().max()
                worst = max(worst, float(diff))
        t_alone.append(time.perf_counter() - t)
    ratios = [a / b for a, b in zip(t_alone, t_batched, strict=True)]
    # the same heads in a standard PyTorch loop, one round (torch.optim's one-time import first)
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    t = time.perf_counter()
    worst_std = 0.0
    for li in range(4):
        for i, (lr, wd) in enumerate([(lr, wd) for lr in DEFAULT_LRS for wd in wds]):
            w = standard_loop_head(xs[li], y, classes, lr, wd, x_val=xs[li, : n // 10], **kw)
            worst_std = max(worst_std, float((w - batched.weight[li, :, i]).abs().max()))
    t_std = time.perf_counter() - t
    return {
        "heads": 4 * len(DEFAULT_LRS) * len(wds),
        "n": n,
        "dim": dim,
        "epochs": epochs,
        "rounds": rounds,
        "batched_s": [round(v, 2) for v in t_batched],
        "one_by_one_s": [round(v, 2) for v in t_alone],
        "speedups": [round(v, 2) for v in ratios],
        "speedup": round(float(np.median(ratios)), 2),
        "max_weight_difference": worst,
        "standard_loop_s": round(t_std, 2),
        "speedup_vs_standard_loop": round(t_std / float(np.median(t_batched)), 2),
        "standard_loop_max_weight_difference": worst_std,
    }


def standard_loop_head(
    x: torch.Tensor,
    y: torch.Tensor,
    classes: int,
    lr: float,
    wd: float,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
) -> torch.Tensor:
    """One head the way a PyTorch user trains it: nn.Linear, torch.optim.SGD (momentum 0.9,
    decay on the weight only), F.cross_entropy and autograd, with probekit's minibatch order,
    cosine schedule and best-epoch choice. Returns the chosen weight (D, C)."""
    from probekit.probes import Rows
    from probekit.probes.grid import minibatches

    lin = torch.nn.Linear(x.shape[1], classes)
    torch.nn.init.zeros_(lin.weight)
    torch.nn.init.zeros_(lin.bias)
    opt = torch.optim.SGD(
        [{"params": [lin.weight], "weight_decay": wd}, {"params": [lin.bias], "weight_decay": 0}],
        lr=lr,
        momentum=0.9,
    )
    gen = torch.Generator().manual_seed(seed)
    rows = Rows.of(x)
    total = epochs * -(-len(y) // batch_size)
    step, best, best_w = 0, (-1.0, 0.0), lin.weight.detach().clone()
    for _ in range(epochs):
        for xb, yb in minibatches(rows, y, batch_size, len(y), gen):
            for g in opt.param_groups:
                g["lr"] = lr * batch_size / 256 * 0.5 * (1 + math.cos(math.pi * step / total))
            step += 1
            loss = torch.nn.functional.cross_entropy(lin(xb[0]), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            logits = lin(x_val)
            score = (
                float((logits.argmax(1) == y_val).double().mean()),
                -float(torch.nn.functional.cross_entropy(logits, y_val)),
            )
            if score > best:
                best, best_w = score, lin.weight.detach().clone()
    return best_w.T


STREAM_CHILD = """
import json, resource, sys, time
from probekit.probes import probe
t = time.perf_counter()
mb = None if sys.argv[2] == "all" else int(sys.argv[2])
res = probe(sys.argv[1], memory_mb=mb, cs=[1e-4, 1e-3, 1e-2], epochs=2, lrs=[1e-3, 1e-2],
            wds=[0.0], write=False)
print(json.dumps({
    "seconds": time.perf_counter() - t,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "logreg_top1": res.value("top1", method="logreg"),
    "linear_top1": res.value("top1", method="linear"),
    "streamed": "features_streamed" in res.selected["logreg"],
}))
"""


def streaming(n: int, dim: int, classes: int, memory_mb: int) -> dict:
    """One probe (both methods, a short grid) in a fresh process on a store whose train
    features exceed `memory_mb`: held in memory vs streamed; peak resident memory of each."""
    import json
    import subprocess
    import sys

    rng = np.random.default_rng(2)
    centers = rng.normal(size=(classes, dim)).astype(np.float32) * 0.12
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.zarr"
        cfg = StoreConfig("bench", "bench", "-", {}, (), (), "float32", "fp32")
        meta = {
            "dataset": {"spec": "bench-big", "fingerprint": "-"},
            "backbone": {"name": "bench"},
            "weights": {"source": "-"},
            "class_names": [str(i) for i in range(classes)],
        }
        chunk = 8192
        sizes = {"train": n, "test": n // 10}
        store = FeatureStore.create(path, cfg, meta, sizes, {"head/embed": dim}, chunk, set())
        for split, rows in sizes.items():
            for c, start in enumerate(range(0, rows, chunk)):
                x, y = features(rng, min(chunk, rows - start), dim, classes, centers)
                store.write_chunk(
                    split,
                    c,
                    chunk,
                    {
                        "head/embed": x,
                        "labels": y,
                        "valid": np.ones(len(y), bool),
                        "ids": np.array([str(start + i) for i in range(len(y))]),
                        "errors": np.array([""] * len(y)),
                    },
                )
        store.update_meta(status="complete")
        out = {"n": n, "dim": dim, "train_mb": round(n * dim * 4 / 2**20), "memory_mb": memory_mb}
        for mode, mb in (("held", "all"), ("streamed", str(memory_mb))):
            run = subprocess.run(
                [sys.executable, "-c", STREAM_CHILD, str(path), mb],
                capture_output=True,
                text=True,
                check=True,
            )
            out[mode] = json.loads(run.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3, help="paired rounds of the heads timing")
    ap.add_argument("--stream-n", type=int, default=200_000, help="rows of the streaming run")
    ap.add_argument("--stream-mb", type=int, default=64, help="its memory budget, MiB")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    lr = logreg_path(args.n, args.dim, args.classes)
    print(
        f"logreg C path ({lr['n_C']} C, {lr['n']} x {lr['dim']}, {lr['classes']} classes): "
        f"probekit {lr['probekit_s']} s, scikit-learn loop {lr['sklearn_s']} s, "
        f"{lr['speedup']}x (first call in the process {lr['probekit_first_call_s']} s, "
        f"{lr['speedup_first_call']}x); chosen C {lr['probekit_C']:.3g} vs {lr['sklearn_C']:.3g}; "
        f"test top-1 {100 * lr['probekit_top1']:.2f} vs {100 * lr['sklearn_top1']:.2f}"
    )
    hd = heads(args.n, args.dim, args.classes, args.epochs, args.rounds)
    print(
        f"linear heads ({hd['heads']} heads, {hd['epochs']} epochs, {hd['rounds']} paired rounds):"
        f" batched {hd['batched_s']} s, one by one {hd['one_by_one_s']} s, "
        f"{hd['speedups']}x, median {hd['speedup']}x; standard PyTorch loop per head "
        f"{hd['standard_loop_s']} s, {hd['speedup_vs_standard_loop']}x "
        f"(max weight difference {hd['standard_loop_max_weight_difference']:.2e}); "
        f"max weight difference {hd['max_weight_difference']:.2e}"
    )
    st = streaming(args.stream_n, args.dim, args.classes, args.stream_mb)
    for mode in ("held", "streamed"):
        r = st[mode]
        print(
            f"{mode} ({st['n']} x {st['dim']} train = {st['train_mb']} MiB, budget "
            f"{'none' if mode == 'held' else str(st['memory_mb']) + ' MiB'}): "
            f"{r['seconds']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MiB, test top-1 logreg "
            f"{100 * r['logreg_top1']:.2f} linear {100 * r['linear_top1']:.2f}"
        )
    save_result(
        "bench_probe",
        "cpu",
        cpu_name(),
        {"threads": torch.get_num_threads(), "logreg": lr, "heads": hd, "streaming": st},
        args.out,
    )


if __name__ == "__main__":
    main()
