"""Probe speed on this machine, in one run.

1. Logistic regression over a C path: probekit.probe (L-BFGS in torch, warm starts along the
   path, C chosen on a 10% holdout, refit on train + holdout) vs a scikit-learn loop over the
   same C values (LogisticRegression(solver="lbfgs") fit from scratch for each C on the same
   standardized features, same holdout). Same chosen C? Test accuracy within 0.3 points?
2. G = 4 layers x 13 lr x 2 wd = 104 linear heads trained together (one batched matmul per
   feature and minibatch) vs the same heads trained one by one (same epochs, batches, seed).

    python benchmarks/bench_probe.py [--n 20000 --dim 384 --classes 10 --epochs 10]
"""

from __future__ import annotations

import argparse
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
        t = time.perf_counter()
        res = probe(store, method="logreg", write=False)
        t_ours = time.perf_counter() - t
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
        "sklearn_s": round(t_sk, 2),
        "speedup": round(t_sk / t_ours, 2),
        "probekit_C": ours_c,
        "sklearn_C": best[1],
        "probekit_top1": ours_acc,
        "sklearn_top1": sk_acc,
    }


def heads(n: int, dim: int, classes: int, epochs: int) -> dict:
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
    t = time.perf_counter()
    batched = train_linear_heads(xs, y, classes, DEFAULT_LRS, wds, x_val=xs[:, : n // 10], **kw)
    t_batched = time.perf_counter() - t
    t = time.perf_counter()
    worst = 0.0
    for li in range(4):
        for i, (lr, wd) in enumerate([(lr, wd) for lr in DEFAULT_LRS for wd in wds]):
            alone = train_linear_heads(
                xs[li], y, classes, [lr], [wd], x_val=xs[li, : n // 10], **kw
            )
            diff = (alone.weight[0, :, 0] - batched.weight[li, :, i]).abs().max()
            worst = max(worst, float(diff))
    t_alone = time.perf_counter() - t
    return {
        "heads": 4 * len(DEFAULT_LRS) * len(wds),
        "n": n,
        "dim": dim,
        "epochs": epochs,
        "batched_s": round(t_batched, 2),
        "one_by_one_s": round(t_alone, 2),
        "speedup": round(t_alone / t_batched, 2),
        "max_weight_difference": worst,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    lr = logreg_path(args.n, args.dim, args.classes)
    print(
        f"logreg C path ({lr['n_C']} C, {lr['n']} x {lr['dim']}, {lr['classes']} classes): "
        f"probekit {lr['probekit_s']} s, scikit-learn loop {lr['sklearn_s']} s, "
        f"{lr['speedup']}x; chosen C {lr['probekit_C']:.3g} vs {lr['sklearn_C']:.3g}; "
        f"test top-1 {100 * lr['probekit_top1']:.2f} vs {100 * lr['sklearn_top1']:.2f}"
    )
    hd = heads(args.n, args.dim, args.classes, args.epochs)
    print(
        f"linear heads ({hd['heads']} heads, {hd['epochs']} epochs): batched {hd['batched_s']} s,"
        f" one by one {hd['one_by_one_s']} s, {hd['speedup']}x; "
        f"max weight difference {hd['max_weight_difference']:.2e}"
    )
    save_result(
        "bench_probe",
        "cpu",
        cpu_name(),
        {"threads": torch.get_num_threads(), "logreg": lr, "heads": hd},
        args.out,
    )


if __name__ == "__main__":
    main()
